"""Retrieval service: FastAPI app with a Search-R1/StepSearch-compatible ``POST /retrieve``.

Request ``{"queries": [...], "topk": k, "return_scores": bool}``; answer ``{"result": [[{"document":
{"id", "contents"}, "score": s}, ...], ...]}``, one list per query in order, or the documents alone
when ``return_scores`` is false (as in Search-R1's ``retrieval_server.py``). ``GET /health`` reports
the index (kind, size, FAISS type), the queue and the limits.

Drop-in for the released clients, which read ``response.json()['result']`` without checking the
status (Search-R1 @a14dc3a and StepSearch @43215ba ``generation.py``): what their rollouts send is
answered with a ``result``. An empty or whitespace query (the model wrote ``<search> </search>``)
gets an empty hit list in its place, and an empty ``queries`` list an empty ``result``; one POST
may carry up to ``max_batch`` queries (8,192 by default: Search-R1's ``train_grpo.sh`` sends
512 prompts x 5 samples = 2,560), searched in chunks of ``max_batch_queries``. Beyond a limit the
answer is a 4xx without ``result``: such a client then fails with ``KeyError: 'result'``
(docs/compatibility.md lists what it can and cannot read).

Under load (departures from the released server, which called the retriever from every request
thread and lost requests to a Java race): all requests go through one
:class:`~stepsearch.retrieval.batcher.SearchBatcher`, so the retriever is called from one thread
and requests of different clients are merged into one search call; a bounded queue answers
503 with ``Retry-After`` when full; each request has a timeout (504); limits on queries per
request and body size (413), query length and ``topk`` (422) name the limit in one line; on
shutdown the service stops accepting, answers what it accepted, then exits. Binds 127.0.0.1
unless told.
"""

# No `from __future__ import annotations`: FastAPI must see the request model class itself,
# which is local to create_app (pydantic/fastapi load lazily).
import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.base import Retriever
from stepsearch.retrieval.batcher import QueueFull, RequestExpired, SearchBatcher, ShuttingDown

DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits and queueing of the service (``serve`` flags of the same names)."""

    max_batch: int = 8192  # queries per request (413 above); every released recipe fits
    max_query_chars: int = 4096  # characters per query (422 above)
    max_topk: int = 100  # passages per query (422 above)
    default_topk: int = 3
    max_queue: int = 256  # requests waiting for the search worker (503 + Retry-After above)
    max_batch_queries: int = 1024  # queries merged into one search call
    batch_wait_ms: float = 0.0  # wait for more requests before a search call
    request_timeout_s: float = 30.0  # queue wait + search (504 above)

    @property
    def max_body_bytes(self) -> int:
        # UTF-8 takes up to 4 bytes a character, JSON escapes up to 6: generous, yet bounded.
        return 6 * self.max_batch * self.max_query_chars + 4096


def describe_retriever(retriever: Retriever) -> dict:
    """What ``/health`` says about the backend: its own ``describe()`` or the class name and size."""
    describe = getattr(retriever, "describe", None)
    if callable(describe):
        return describe()
    inner = getattr(retriever, "inner", None)
    return {"retriever": type(retriever).__name__,
            "num_docs": getattr(retriever, "num_docs", getattr(inner, "num_docs", None))}


def create_app(retriever: Retriever, limits: ServiceLimits | None = None, **overrides):
    """Build the FastAPI app serving ``retriever``; ``overrides`` set :class:`ServiceLimits` fields."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field, ValidationError

    limits = ServiceLimits(**{**(limits or ServiceLimits()).__dict__, **overrides})

    class RetrieveRequest(BaseModel):
        queries: list[str] = Field(..., description="search queries, one result list each")
        topk: int | None = Field(None, description=f"passages per query (default {limits.default_topk})")
        return_scores: bool = False

    batcher = SearchBatcher(retriever, max_queue=limits.max_queue, max_batch_queries=limits.max_batch_queries,
                            batch_wait_s=limits.batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and answered the requests in flight: finish the queue.
        await asyncio.to_thread(batcher.stop, True, limits.request_timeout_s)

    app = FastAPI(title="stepsearch retrieval", description=__doc__, lifespan=lifespan)
    app.state.retriever, app.state.batcher, app.state.limits = retriever, batcher, limits

    def reject(message: str, status: int, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(status_code=status, content={"detail": message}, headers=headers)

    def validation_detail(errors) -> str:
        problems = []
        for error in errors:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return "; ".join(problems)[:500]

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return reject(validation_detail(exc.errors()), 422)

    async def read_body(request: Request) -> bytes | None:
        """The body, or ``None`` once it exceeds ``max_body_bytes`` (checked before parsing)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def check(body: RetrieveRequest) -> JSONResponse | None:
        queries, k = body.queries, body.topk if body.topk is not None else limits.default_topk
        if len(queries) > limits.max_batch:
            return reject(f"too many queries: {len(queries)} > {limits.max_batch} per request; split the batch", 413)
        if not 1 <= k <= limits.max_topk:
            return reject(f"topk must be between 1 and {limits.max_topk}, got {k}", 422)
        for position, query in enumerate(queries):
            if len(query) > limits.max_query_chars:
                return reject(f"query at position {position} has {len(query)} characters "
                              f"(limit {limits.max_query_chars})", 422)
        return None

    async def search(queries: list[str], k: int) -> list:
        """The batcher's hit lists; past the request timeout the request is abandoned (counted
        expired once) and ``TimeoutError`` raised, unless its answer arrived meanwhile."""
        future = batcher.submit(queries, k, limits.request_timeout_s)
        waiter = asyncio.wrap_future(future)
        # asyncio.wait, not wait_for: a timeout must not cancel the future behind abandon()'s back.
        await asyncio.wait({waiter}, timeout=limits.request_timeout_s)
        if not future.done() and batcher.abandon(future):
            waiter.cancel()
            raise asyncio.TimeoutError
        return future.result()

    @app.post("/retrieve")
    async def retrieve(request: Request):
        raw = await read_body(request)
        if raw is None:
            return reject(f"request body larger than {limits.max_body_bytes} bytes "
                          f"(limits: {limits.max_batch} queries of {limits.max_query_chars} characters)", 413)
        try:
            body = RetrieveRequest.model_validate_json(raw or b"{}")
        except ValidationError as err:
            return reject(validation_detail(err.errors()), 422)
        if (problem := check(body)) is not None:
            return problem
        k = body.topk if body.topk is not None else limits.default_topk
        # Empty queries are not searched: each gets an empty hit list in its place.
        searched = [position for position, query in enumerate(body.queries) if query.strip()]
        results: list[list] = [[] for _ in body.queries]
        try:
            found = await search([body.queries[position] for position in searched], k) if searched else []
        except QueueFull as err:
            return reject(str(err), 503, err.retry_after_s)
        except ShuttingDown as err:
            return reject(str(err), 503, 1)
        except (asyncio.TimeoutError, RequestExpired):
            return reject(f"search did not finish within the request timeout ({limits.request_timeout_s:g} s)", 504)
        except StepSearchError as err:
            return reject(str(err), 503, 1)
        except Exception as err:  # noqa: BLE001 - a backend failure must not leak a trace
            first = str(err).splitlines()[0][:200] if str(err) else ""
            return reject(f"retriever failed: {type(err).__name__}: {first}", 503, 1)
        for position, hits in zip(searched, found):
            results[position] = hits
        if body.return_scores:
            payload = [[{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in hits]
                       for hits in results]
        else:
            payload = [[{"id": p.id, "contents": p.contents} for p in hits] for hits in results]
        return {"result": payload}

    @app.get("/health")
    def health():
        stats = batcher.stats()
        return {
            "status": "ok" if batcher.accepting else "stopping",
            **describe_retriever(retriever),  # per call: a cache's hit counters change
            "requests": stats.requests,
            # expired: answered 504 (waited or searched past the timeout); pending: waiting callers.
            "queue": {"pending": stats.pending, "max": limits.max_queue, "rejected": stats.rejected,
                      "expired": stats.expired, "failed": stats.failed},
            "batching": {"search_calls": stats.batches, "mean_requests_per_call": round(stats.mean_batch_requests, 2),
                         "queries": stats.queries, "searched_queries": stats.searched_queries},
            "limits": {"max_batch": limits.max_batch, "max_query_chars": limits.max_query_chars,
                       "max_topk": limits.max_topk, "max_queue": limits.max_queue,
                       "request_timeout_s": limits.request_timeout_s},
        }

    return app


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread; ``stop()`` shuts it down gracefully and waits."""

    server: object
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _config(app, **kwargs):
    import uvicorn

    # The shutdown deadline: in-flight requests get up to their own timeout to finish.
    grace = int(getattr(getattr(app, "state", None), "limits", ServiceLimits()).request_timeout_s) + 1
    return uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=grace, **kwargs)


def serve_in_thread(app, host: str = DEFAULT_HOST, port: int = 0, timeout_s: float = 20.0) -> ServerHandle:
    """Start ``app`` with uvicorn in a daemon thread; ``port=0`` picks a free port. Returns when ready."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    # backlog: the load tests open many connections at once; the kernel queue must not refuse them.
    server = uvicorn.Server(_config(app, log_level="warning", access_log=False, backlog=2048))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stepsearch-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise StepSearchError(f"retrieval service did not start on {host}:{bound_port}")
        time.sleep(0.02)
    return ServerHandle(server=server, thread=thread, host=host, port=bound_port)


def run_server(app, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until SIGINT/SIGTERM, then shut down gracefully and return."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful stop, killing the process before our
            # cleanup (exit status -15); a stop we asked for is a normal end: return instead.
            getattr(self, "_captured_signals", []).clear()

    GracefulServer(_config(app, host=host, port=port, log_level=log_level)).run()
