"""Concurrency: the BM25 race, the service under many loopback clients, queue overflow, timeout, shutdown.

Everything is bounded (a few seconds each) and loopback only. The slow cases put a delay in
front of the real BM25 retriever, so that a queue can fill deterministically.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.batcher import QueueFull, SearchBatcher
from stepsearch.retrieval.client import HttpRetriever
from stepsearch.retrieval.server import create_app, serve_in_thread


def _ids(results):
    return [[(hit.id, round(hit.score, 4)) for hit in hits] for hits in results]


@pytest.fixture(scope="module")
def query_pool(corpus):
    # Titles and title words of the shared corpus: real queries with non-trivial hit lists.
    titles = [p.title for p in corpus.passages[:600]]
    return titles + [f"{t.split()[0]} history" for t in titles[:200]]


def test_concurrent_callers_of_one_bm25_retriever_get_sequential_results(bm25_retriever, query_pool):
    """16 threads share one retriever. Without the JVM lock pyjnius mixed up their calls
    (NullPointerException / IncompatibleClassChangeError in ~2 of 3 runs of this test)."""
    calls = [(query_pool[(i * 4) % 780 : (i * 4) % 780 + 1 + i % 4], 3) for i in range(640)]
    expected = [_ids(bm25_retriever.search(queries, k)) for queries, k in calls]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda call: _ids(bm25_retriever.search(*call)), calls))
    assert got == expected


def test_many_http_clients_all_answered_like_a_sequential_run(bm25_retriever, query_pool):
    requests = [query_pool[(i * 8) % 790 : (i * 8) % 790 + 8] for i in range(320)]  # 32 clients x 10 requests
    expected = [_ids(bm25_retriever.search(queries, 3)) for queries in requests]
    app = create_app(bm25_retriever, max_batch=16, max_queue=64)
    with serve_in_thread(app) as service:
        clients = [HttpRetriever(service.url, max_retries=0, timeout_s=60) for _ in range(32)]

        def run(client_no):
            client = clients[client_no]
            return [(n, _ids(client.search(requests[n], 3))) for n in range(client_no, len(requests), 32)]

        with ThreadPoolExecutor(32) as pool:
            answered = dict(pair for chunk in pool.map(run, range(32)) for pair in chunk)
        health = httpx.get(f"{service.url}/health").json()
    assert [answered[n] for n in range(len(requests))] == expected  # every request, right hits, right order
    assert health["requests"] == 320 and health["queue"]["rejected"] == 0 and health["queue"]["failed"] == 0
    # Requests of different clients were merged into shared search calls.
    assert health["batching"]["search_calls"] < 320 and health["batching"]["mean_requests_per_call"] > 1


class SlowRetriever:
    """The real BM25 retriever behind a fixed delay per search call."""

    def __init__(self, inner, delay_s):
        self.inner, self.delay_s, self.calls = inner, delay_s, 0

    def search(self, queries, k):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.search(queries, k)


def test_full_queue_answers_503_with_retry_after(bm25_retriever):
    slow = SlowRetriever(bm25_retriever, 0.8)  # long enough that all 16 arrive while the first is searched
    queries = ["Neil Peart", "Jeff Porcaro", "Mountrail County", "Van Hook Township"]
    expected = _ids(bm25_retriever.search(queries, 2))
    with serve_in_thread(create_app(slow, max_queue=3, max_batch_queries=4)) as service:
        barrier = threading.Barrier(16)

        def post(_):
            barrier.wait()
            return httpx.post(f"{service.url}/retrieve", json={"queries": queries, "topk": 2, "return_scores": True},
                              timeout=30)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, range(16)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}
    # one request searching + at most 3 queued; at least that many are answered, the rest refused
    assert 4 <= statuses.count(200) <= 10 and statuses.count(503) >= 6
    for response in responses:
        if response.status_code == 503:
            assert response.json()["detail"] == "search queue is full (3 requests waiting); retry later"
            assert int(response.headers["retry-after"]) >= 1
        else:
            hits = [[(h["document"]["id"], round(h["score"], 4)) for h in hs] for hs in response.json()["result"]]
            assert hits == expected


def test_request_timeout_is_504_and_the_client_retries_it(bm25_retriever):
    with serve_in_thread(create_app(SlowRetriever(bm25_retriever, 0.8), request_timeout_s=0.2)) as service:
        response = httpx.post(f"{service.url}/retrieve", json={"queries": ["Neil Peart"], "topk": 1}, timeout=10)
        assert response.status_code == 504
        assert response.json()["detail"] == "search did not finish within the request timeout (0.2 s)"
        client = HttpRetriever(service.url, max_retries=1, backoff_s=0.0)
        client._sleep = lambda s: None
        with pytest.raises(RetrievalError, match=r"after 2 attempt\(s\) \(HTTP 504: search did not finish"):
            client.search(["Neil Peart"], 1)


def test_graceful_shutdown_answers_requests_in_flight(bm25_retriever):
    slow = SlowRetriever(bm25_retriever, 0.3)
    service = serve_in_thread(create_app(slow, max_batch_queries=1))  # one request per call: a real backlog
    queries = [["Neil Peart"], ["Jeff Porcaro"], ["Mountrail County"], ["Cream band"], ["Toto"]]
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(httpx.post, f"{service.url}/retrieve", json={"queries": q, "topk": 1}, timeout=30)
                   for q in queries]
        deadline = time.monotonic() + 10
        while service.server.config.app.state.batcher.stats().pending < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until all five are accepted (one searching, four queued)
        started = time.monotonic()
        service.stop()
        stopped_after = time.monotonic() - started
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.json()["result"][0][0]["id"] for r in responses] == [
        bm25_retriever.search(q, 1)[0][0].id for q in queries
    ]
    assert slow.calls == 5 and stopped_after >= 0.9  # it waited for the backlog (5 x 0.3 s)
    assert not service.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{service.url}/retrieve", json={"queries": ["Toto"]}, timeout=2)


class PoisonRetriever:
    """Real BM25, except that one query makes the backend fail."""

    def __init__(self, inner):
        self.inner = inner

    def search(self, queries, k):
        if "poison" in queries:
            raise RetrievalError("backend failed on this request")
        return self.inner.search(queries, k)


def test_batcher_isolates_a_failing_request_and_refuses_when_full(bm25_retriever):
    batcher = SearchBatcher(PoisonRetriever(bm25_retriever), max_queue=8, batch_wait_s=0.2)
    good = batcher.submit(["Neil Peart"], 1)
    bad = batcher.submit(["poison"], 1)
    other = batcher.submit(["Jeff Porcaro"], 1)
    assert good.result(10)[0][0].title == "Neil Peart" and other.result(10)[0][0].title == "Jeff Porcaro"
    with pytest.raises(RetrievalError, match="backend failed on this request"):
        bad.result(10)
    stats = batcher.stats()
    assert (stats.requests, stats.failed, stats.pending) == (2, 1, 0)
    batcher.stop()
    slow = SearchBatcher(SlowRetriever(bm25_retriever, 0.5), max_queue=1)
    first = slow.submit(["Toto"], 1)
    time.sleep(0.1)  # the worker took it: the queue is empty again
    second = slow.submit(["Toto"], 1)
    with pytest.raises(QueueFull, match=r"search queue is full \(1 requests waiting\)"):
        slow.submit(["Toto"], 1)
    slow.stop(drain=True)
    assert first.result(0)[0][0].id == second.result(0)[0][0].id


def test_serve_command_health_and_sigterm(bm25_index, tmp_path):
    """`python -m stepsearch serve` reports its index on /health and exits 0 on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), COLUMNS="400")
    process = subprocess.Popen(
        [sys.executable, "-m", "stepsearch", "serve", "--index", str(bm25_index), "--port", str(port),
         "--max-queue", "7", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline, health = time.monotonic() + 60, None
        while health is None and time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None, process.stderr.read() if process.poll() is not None else "no answer"
        assert (health["kind"], health["num_docs"], health["queue"]["max"]) == ("bm25", 7416, 7)
        assert HttpRetriever(f"http://127.0.0.1:{port}").search(["Neil Peart"], 1)[0][0].title == "Neil Peart"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
