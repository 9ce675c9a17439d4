"""HTTP client retriever for a remote Search-R1/StepSearch-compatible ``POST /retrieve`` service.

Request ``{"queries": [...], "topk": k, "return_scores": true}``; response ``{"result": [[{"document":
{"id", "contents"}, "score"}, ...], ...]}`` (documents alone when a server ignores return_scores;
FlashRAG-style ``title``/``text`` documents are accepted too). The released StepSearch trainer
had no timeout or retry: a stalled retriever froze training. Here every request has a timeout;
connection errors, timeouts and 5xx answers (our service's 503 "queue full" and 504 "timeout"
included) are retried ``max_retries`` times with exponential back-off (``backoff_s * 2**attempt``),
never sooner than the server's ``Retry-After`` and never longer than 30 s; 4xx answers (a limit
exceeded, a bad query) are not retried. Batches larger than ``batch_size`` are sent in several
requests (the service refuses more than its ``max_batch`` queries with 413). When the service
stays down, :class:`~stepsearch.errors.RetrievalError` says so in one line.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Passage, check_search_args, split_contents

MAX_BACKOFF_S = 30.0


def retrieve_url(url: str) -> str:
    """``http://host:port`` → ``http://host:port/retrieve``; a URL with a path is used as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RetrievalError(f"retriever URL must look like http://HOST:PORT[/retrieve], got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/retrieve"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def parse_hit(item: object, position: int) -> Passage:
    """One entry of a result list (``{"document": ..., "score"}`` or a bare document) → Passage."""
    score = 0.0
    document = item
    if isinstance(item, dict) and isinstance(item.get("document"), dict):
        document, score = item["document"], float(item.get("score") or 0.0)
    if not isinstance(document, dict):
        raise RetrievalError(f"retrieval service sent a hit that is not an object: {str(item)[:100]}")
    doc_id = document.get("id", document.get("doc_id", document.get("docid", position)))
    if isinstance(document.get("contents"), str):
        title, text = split_contents(document["contents"])
    else:
        title, text = str(document.get("title") or ""), str(document.get("text") or "")
    return Passage(id=str(doc_id), title=title, text=text, score=score)


class HttpRetriever:
    """Retriever that calls a remote ``/retrieve`` endpoint (see module docstring)."""

    def __init__(
        self, url: str, timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 0.5, batch_size: int = 512
    ) -> None:
        import httpx

        if timeout_s <= 0:
            raise RetrievalError(f"timeout_s must be positive, got {timeout_s}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise RetrievalError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if backoff_s < 0:
            raise RetrievalError(f"backoff_s must be >= 0, got {backoff_s}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise RetrievalError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.url = retrieve_url(url)
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), max_retries, float(backoff_s)
        self._client = httpx.Client(timeout=self.timeout_s)
        self._sleep = time.sleep  # replaceable in tests

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        check_search_args(queries, k)
        results: list[list[Passage]] = []
        for start in range(0, len(queries), self.batch_size):
            batch = list(queries[start : start + self.batch_size])
            payload = self._post({"queries": batch, "topk": int(k), "return_scores": True})
            result = payload.get("result") if isinstance(payload, dict) else None
            if not isinstance(result, list) or len(result) != len(batch):
                got = f"{len(result)} result lists" if isinstance(result, list) else "no 'result' list"
                raise RetrievalError(f"retrieval service at {self.url} answered {got} for {len(batch)} queries")
            results += [[parse_hit(item, rank) for rank, item in enumerate(hits[:k])] for hits in result]
        return results

    def _post(self, body: dict) -> object:
        import httpx

        last_error = ""
        retry_after = 0.0
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                self._sleep(min(max(self.backoff_s * 2 ** (attempt - 1), retry_after), MAX_BACKOFF_S))
            retry_after = 0.0
            try:
                response = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last_error = f"no answer within {self.timeout_s:g} s"
                continue
            except httpx.TransportError as err:
                last_error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                continue
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                retry_after = _retry_after_s(response)
                continue
            if response.status_code >= 400:
                raise RetrievalError(f"retrieval service at {self.url} rejected the request: "
                                     f"HTTP {response.status_code}: {_detail(response)}")
            try:
                return response.json()
            except ValueError:
                raise RetrievalError(f"retrieval service at {self.url} sent a non-JSON answer") from None
        raise RetrievalError(
            f"retrieval service at {self.url} is unavailable after {attempts} attempt(s) ({last_error}); "
            "start it with `python -m stepsearch serve --index DIR` or fix retriever.url"
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpRetriever({self.url!r}, timeout_s={self.timeout_s:g}, max_retries={self.max_retries})"

    def describe(self) -> dict:
        return {"retriever": type(self).__name__, "kind": "http", "url": self.url}


def _retry_after_s(response) -> float:
    """``Retry-After`` in seconds (the delay form; an HTTP date is ignored), else 0."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


def _detail(response) -> str:
    try:
        data = response.json()
        detail = data.get("detail", data) if isinstance(data, dict) else data
    except ValueError:
        detail = response.text
    return str(detail)[:200]
