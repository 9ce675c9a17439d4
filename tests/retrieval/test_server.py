"""The retrieval service on a free loopback port, queried through HttpRetriever; retry/timeout paths."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.client import HttpRetriever, parse_hit, retrieve_url
from stepsearch.retrieval.server import create_app, serve_in_thread


@pytest.fixture(scope="module")
def service(bm25_retriever):
    handle = serve_in_thread(create_app(bm25_retriever, max_batch=8, max_query_chars=200, max_topk=20))
    yield handle
    handle.stop()


def _client(url, **kwargs):
    client = HttpRetriever(url, **kwargs)
    client.sleeps = []
    client._sleep = client.sleeps.append  # record back-off instead of sleeping
    return client


def test_http_retriever_matches_local_search(service, bm25_retriever):
    assert service.host == "127.0.0.1" and service.port > 0
    queries = ["Jeff Porcaro drummer", "Mountrail County capital", "Neil Peart Rush"]
    with HttpRetriever(service.url) as client:
        remote = client.search(queries, 3)
    local = bm25_retriever.search(queries, 3)
    assert remote == local  # ids, titles, texts and scores survive the JSON round trip


def test_wire_format_is_search_r1_compatible(service):
    body = {"queries": ["Jeff Porcaro drummer", "Neil Peart"], "topk": 2, "return_scores": True}
    answer = httpx.post(f"{service.url}/retrieve", json=body).json()
    assert list(answer) == ["result"] and len(answer["result"]) == 2
    first = answer["result"][0][0]
    assert set(first) == {"document", "score"}
    assert set(first["document"]) == {"id", "contents"}
    assert first["document"]["id"] == "hotpotqa-ec8d9019af02"
    assert first["document"]["contents"].startswith('"Jeff Porcaro"\nJeffrey Thomas Porcaro')
    plain = httpx.post(f"{service.url}/retrieve", json={"queries": ["Neil Peart"], "topk": 1}).json()
    assert set(plain["result"][0][0]) == {"id", "contents"}  # documents alone without return_scores
    default_k = httpx.post(f"{service.url}/retrieve", json={"queries": ["Neil Peart"]}).json()
    assert len(default_k["result"][0]) == 3


@pytest.mark.parametrize(
    "body,status,detail",
    [
        ({"queries": ["ok"], "topk": 0}, 422, "topk must be between 1 and 20"),
        ({"queries": ["ok"], "topk": 21}, 422, "topk must be between 1 and 20"),
        ({"queries": ["q"] * 9, "topk": 3}, 413, "too many queries: 9 > 8"),
        ({"queries": ["x" * 201], "topk": 3}, 422, "query at position 0 has 201 characters (limit 200)"),
        ({"queries": "not a list", "topk": 3}, 422, "queries: Input should be a valid array"),
        ({"topk": 3}, 422, "queries: Field required"),
    ],
)
def test_bad_requests_get_4xx_with_one_line(service, body, status, detail):
    response = httpx.post(f"{service.url}/retrieve", json=body)
    assert response.status_code == status
    message = response.json()["detail"]
    assert isinstance(message, str) and detail in message and "\n" not in message


def test_client_does_not_retry_4xx(service):
    client = _client(service.url, max_retries=3, backoff_s=0.1)
    with pytest.raises(RetrievalError, match="rejected the request: HTTP 422: topk must be between 1 and 20"):
        client.search(["ok"], 50)
    assert client.sleeps == []


def test_body_larger_than_the_limits_is_413_before_parsing(service):
    too_big = b'{"queries": ["' + b"x" * (6 * 8 * 200 + 5000) + b'"]}'
    response = httpx.post(f"{service.url}/retrieve", content=too_big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("request body larger than 13696 bytes (limits: 8 queries of 200")
    response = httpx.post(f"{service.url}/retrieve", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "\n" not in response.json()["detail"]


def test_health(service, bm25_index):
    health = httpx.get(f"{service.url}/health").json()
    assert health["status"] == "ok" and health["retriever"] == "BM25Retriever"
    assert (health["kind"], health["num_docs"], health["index"]) == ("bm25", 7416, str(bm25_index))
    assert health["limits"]["max_batch"] == 8 and health["queue"]["max"] == 256


def test_service_stopped_midway_gives_clear_error_after_retries(bm25_retriever):
    handle = serve_in_thread(create_app(bm25_retriever))
    client = _client(handle.url, timeout_s=2.0, max_retries=3, backoff_s=0.05)
    assert client.search(["Neil Peart"], 1)[0][0].title == "Neil Peart"
    handle.stop()
    with pytest.raises(RetrievalError) as info:
        client.search(["Neil Peart"], 1)
    message = str(info.value)
    assert message.startswith(f"retrieval service at {handle.url}/retrieve is unavailable after 4 attempt(s)")
    assert "ConnectError" in message and "stepsearch serve" in message and "\n" not in message
    assert client.sleeps == [0.05, 0.1, 0.2]  # exponential back-off between the 4 attempts


class SlowRetriever:
    """The real BM25 retriever behind a delay, to trigger the client timeout."""

    def __init__(self, inner, delay_s):
        self.inner, self.delay_s = inner, delay_s

    def search(self, queries, k):
        time.sleep(self.delay_s)
        return self.inner.search(queries, k)


class FailingRetriever:
    def search(self, queries, k):
        raise RetrievalError("index is being rebuilt")


def test_timeout_and_5xx_are_retried_then_reported(bm25_retriever):
    with serve_in_thread(create_app(SlowRetriever(bm25_retriever, 1.5))) as slow:
        client = _client(slow.url, timeout_s=0.3, max_retries=1, backoff_s=0.01)
        with pytest.raises(RetrievalError, match=r"unavailable after 2 attempt\(s\) \(no answer within 0.3 s\)"):
            client.search(["Neil Peart"], 1)
        assert client.sleeps == [0.01]
        patient = HttpRetriever(slow.url, timeout_s=5.0)
        assert patient.search(["Neil Peart"], 1)[0][0].title == "Neil Peart"
    with serve_in_thread(create_app(FailingRetriever())) as failing:
        client = _client(failing.url, max_retries=2, backoff_s=0.01)
        with pytest.raises(RetrievalError, match=r"after 3 attempt\(s\) \(HTTP 503: index is being rebuilt\)"):
            client.search(["Neil Peart"], 1)
        assert client.sleeps == [1.0, 1.0]  # the server's Retry-After (1 s) wins over the 0.01/0.02 s back-off


def test_client_argument_checks():
    assert retrieve_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/retrieve"
    assert retrieve_url("http://host:1/custom/path") == "http://host:1/custom/path"
    with pytest.raises(RetrievalError, match="must look like http"):
        HttpRetriever("localhost:8000")
    with pytest.raises(RetrievalError, match="k must be a positive integer"):
        HttpRetriever("http://127.0.0.1:9").search(["q"], 0)
    flashrag = parse_hit({"title": "T", "text": "body", "id": 5}, 0)
    assert (flashrag.id, flashrag.title, flashrag.text, flashrag.score) == ("5", "T", "body", 0.0)
