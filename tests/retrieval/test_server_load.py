"""Concurrency: the BM25 race, the service under many loopback clients, queue overflow, timeout, shutdown,
and what /health counts after timeouts.

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
from stepsearch.retrieval.batcher import QueueFull, RequestExpired, SearchBatcher
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


class GatedRetriever:
    """The real BM25 retriever, whose searches wait until ``gate`` is set (``entered`` marks the first)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.entered, self.gate = threading.Event(), threading.Event()

    def search(self, queries, k):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.search(queries, k)


def _open_when(gated, condition, deadline_s=30.0):
    """Set ``gated.gate`` from a watcher thread once ``condition()`` holds (or the deadline passes)."""

    def watch():
        deadline = time.monotonic() + deadline_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        gated.gate.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_full_queue_answers_503_with_retry_after(bm25_retriever):
    gated = GatedRetriever(bm25_retriever)
    queries = ["Neil Peart", "Jeff Porcaro", "Mountrail County", "Van Hook Township"]
    expected = _ids(bm25_retriever.search(queries, 2))
    app = create_app(gated, max_queue=3, max_batch_queries=4)  # one 4-query request per round
    batcher = app.state.batcher
    with serve_in_thread(app) as service:
        def post(_=None):
            return httpx.post(f"{service.url}/retrieve", json={"queries": queries, "topk": 2, "return_scores": True},
                              timeout=30)

        with ThreadPoolExecutor(16) as pool:
            first = pool.submit(post)
            assert gated.entered.wait(30)  # the worker is searching the first request: the queue is empty
            # The 15 others: 3 fill the queue, 12 are refused; the search ends only after all 12 refusals.
            watcher = _open_when(gated, lambda: batcher.stats().rejected >= 12)
            others = list(pool.map(post, range(15)))
            responses = [first.result(), *others]
        watcher.join(5)
    statuses = [r.status_code for r in responses]
    assert (statuses.count(200), statuses.count(503)) == (4, 12) and gated.calls == 4
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
        self.inner, self.calls = inner, 0

    def search(self, queries, k):
        self.calls += 1
        if "poison" in queries:
            raise RetrievalError("backend failed on this request")
        return self.inner.search(queries, k)


def test_batcher_isolates_a_failing_request_and_refuses_when_full(bm25_retriever):
    poison = PoisonRetriever(bm25_retriever)
    batcher = SearchBatcher(poison, max_queue=8, batch_wait_s=0.2)
    good = batcher.submit(["Neil Peart"], 1)
    bad = batcher.submit(["poison"], 1)
    other = batcher.submit(["Jeff Porcaro"], 1)
    assert good.result(10)[0][0].title == "Neil Peart" and other.result(10)[0][0].title == "Jeff Porcaro"
    with pytest.raises(RetrievalError, match="backend failed on this request"):
        bad.result(10)
    stats = batcher.stats()
    assert (stats.requests, stats.failed, stats.pending) == (2, 1, 0)
    # One merged call for the three (it failed), then one call per request: merged, then isolated.
    assert poison.calls == 4 and stats.batches == 2
    batcher.stop()
    gated = GatedRetriever(bm25_retriever)
    slow = SearchBatcher(gated, max_queue=1)
    first = slow.submit(["Toto"], 1)
    assert gated.entered.wait(30)  # the worker took it: the queue is empty again
    second = slow.submit(["Toto"], 1)
    with pytest.raises(QueueFull, match=r"search queue is full \(1 requests waiting\)"):
        slow.submit(["Toto"], 1)
    gated.gate.set()
    slow.stop(drain=True)
    assert first.result(0)[0][0].id == second.result(0)[0][0].id


class WrongShapeRetriever:
    """Real BM25, except that some queries get a wrong-shaped answer (a broken backend)."""

    def __init__(self, inner):
        self.inner = inner

    def search(self, queries, k):
        hits = self.inner.search(queries, k)
        if "short" in queries:
            return hits[:-1]  # one hit list too few
        if "unlistable" in queries:
            return [None] * len(queries)  # fails while slicing the answer, outside the search call
        return hits


def test_batcher_survives_a_wrong_shaped_answer(bm25_retriever):
    batcher = SearchBatcher(WrongShapeRetriever(bm25_retriever))
    try:
        with pytest.raises(RetrievalError, match=r"WrongShapeRetriever.search returned 1 hit lists for 2 queries"):
            batcher.submit(["Neil Peart", "short"], 1).result(10)
        with pytest.raises(TypeError):
            batcher.submit(["unlistable"], 1).result(10)
        # The worker is still alive and answers the next request.
        assert batcher.submit(["Neil Peart"], 1).result(10)[0][0].title == "Neil Peart"
        stats = batcher.stats()
        assert (stats.failed, stats.requests, stats.pending) == (2, 1, 0)
    finally:
        batcher.stop()


def test_health_reports_live_cache_counters(bm25_retriever):
    from stepsearch.retrieval.cache import CachedRetriever

    with serve_in_thread(create_app(CachedRetriever(bm25_retriever, max_size=16))) as service:
        before = httpx.get(f"{service.url}/health").json()["cache"]
        for _ in range(2):
            assert httpx.post(f"{service.url}/retrieve", json={"queries": ["Toto"], "topk": 1}).status_code == 200
        after = httpx.get(f"{service.url}/health").json()["cache"]
    assert (before["hits"], before["misses"], before["size"]) == (0, 0, 0)
    assert (after["hits"], after["misses"], after["size"]) == (1, 1, 1)


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


# /health counts what callers got: a request answered 504 is `expired` (once), and `pending` counts
# only requests whose callers still wait, even while abandoned ones still sit in the queue.


def test_timed_out_requests_are_expired_and_not_pending(bm25_retriever):
    gated = GatedRetriever(bm25_retriever)
    app = create_app(gated, request_timeout_s=0.5, max_batch_queries=1)  # one request per search call
    try:
        with serve_in_thread(app) as service:
            def post(query):
                return httpx.post(f"{service.url}/retrieve", json={"queries": [query], "topk": 1}, timeout=30)

            with ThreadPoolExecutor(6) as pool:
                first = pool.submit(post, "Neil Peart")
                assert gated.entered.wait(30)  # the worker is searching the first request
                queued = list(pool.map(post, ["Toto", "Jeff Porcaro", "Cream band", "Mountrail County", "Rush"]))
                responses = [first.result(), *queued]
            assert [r.status_code for r in responses] == [504] * 6  # every client has its answer
            health = httpx.get(f"{service.url}/health").json()
            # Five abandoned requests are still in the queue behind the closed gate: nobody waits for them.
            assert (health["queue"]["expired"], health["queue"]["pending"], health["requests"]) == (6, 0, 0)
            gated.gate.set()
            answered = post("Van Hook Township")
            assert answered.status_code == 200 and answered.json()["result"][0][0]["id"]
            health = httpx.get(f"{service.url}/health").json()
    finally:
        gated.gate.set()
    # The first request was searched after its caller left: its result is not counted as answered.
    assert (health["queue"]["expired"], health["queue"]["pending"], health["requests"]) == (6, 0, 1)
    assert health["queue"]["failed"] == 0 and gated.calls == 2  # the abandoned queued ones were never searched


def test_a_request_past_its_deadline_in_the_queue_is_counted_once(bm25_retriever):
    gated = GatedRetriever(bm25_retriever)
    batcher = SearchBatcher(gated, max_queue=4)
    try:
        first = batcher.submit(["Toto"], 1, timeout_s=30)
        assert gated.entered.wait(30)
        late = batcher.submit(["Neil Peart"], 1, timeout_s=0.05)
        time.sleep(0.1)
        gated.gate.set()
        with pytest.raises(RequestExpired):
            late.result(10)
        assert first.result(10)[0][0].title
        assert not batcher.abandon(late)  # it has its outcome already: nothing more to count
        stats = batcher.stats()
        assert (stats.expired, stats.requests, stats.pending) == (1, 1, 0)
    finally:
        gated.gate.set()
        batcher.stop()
