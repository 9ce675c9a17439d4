"""Cross-request micro-batching: one worker thread owns the retriever and answers queued requests.

The retrieval service receives many small requests at once (every rollout worker, every rank of a
training run). Calling the retriever from each server thread is both unsafe (Pyserini's Java
objects are reached through pyjnius, which is not thread-safe: concurrent calls failed with
``NullPointerException``) and slow (a batch of 512 queries costs far less than 512 single calls:
Lucene's ``batch_search`` runs a Java thread pool, a dense encoder fills its matrix multiplies).

:class:`SearchBatcher` puts every request in a bounded FIFO queue; a single worker takes all that
is waiting (up to ``max_batch_queries`` queries), groups it by ``k``, drops duplicate queries, runs
one ``search`` call per group and hands each request its own slice. A full queue refuses at once
(:class:`QueueFull`, the service's 503 + ``Retry-After``), a request that waited past its deadline
is not searched (:class:`RequestExpired`), and ``stop(drain=True)`` answers what was accepted
before the worker exits (graceful shutdown). If a merged search fails, each request of the group
is retried alone, so one request's failure never fails the others.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Retriever

_STOP = object()


class QueueFull(RetrievalError):
    """The queue holds ``max_queue`` requests already; ``retry_after_s`` estimates when to retry."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(RetrievalError):
    """The batcher is stopping: it accepts no new request."""


class RequestExpired(RetrievalError):
    """The request waited in the queue past its deadline and was not searched."""


@dataclass
class _Request:
    queries: list[str]
    k: int
    deadline: float
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    """Counters since start (``pending`` is the queue length now)."""

    requests: int = 0
    queries: int = 0
    batches: int = 0
    searched_queries: int = 0  # after de-duplication inside batches
    rejected: int = 0
    expired: int = 0
    failed: int = 0
    pending: int = 0

    @property
    def mean_batch_requests(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class SearchBatcher:
    """Serialize and micro-batch ``retriever.search`` calls from many threads (see module docstring).

    Args:
        retriever: any :class:`Retriever`; only the worker thread calls it.
        max_queue: requests waiting at most; one more raises :class:`QueueFull`.
        max_batch_queries: queries merged into one round at most (a larger request runs alone).
        batch_wait_s: after the first request of a round, wait this long for more (0: take only
            what is already queued; under load the queue fills while the previous round runs).
    """

    def __init__(
        self, retriever: Retriever, max_queue: int = 256, max_batch_queries: int = 1024, batch_wait_s: float = 0.0
    ) -> None:
        if not isinstance(max_queue, int) or max_queue <= 0:
            raise RetrievalError(f"max_queue must be a positive integer, got {max_queue!r}")
        if not isinstance(max_batch_queries, int) or max_batch_queries <= 0:
            raise RetrievalError(f"max_batch_queries must be a positive integer, got {max_batch_queries!r}")
        if batch_wait_s < 0:
            raise RetrievalError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        self.retriever, self.max_queue = retriever, max_queue
        self.max_batch_queries, self.batch_wait_s = max_batch_queries, float(batch_wait_s)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._accepting = True
        self._stats = BatcherStats()
        self._round_seconds = 0.0  # moving average of one round's duration, for Retry-After
        self._carry: _Request | None = None
        self._worker = threading.Thread(target=self._run, name="stepsearch-search-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ callers

    def submit(self, queries: list[str], k: int, timeout_s: float = 30.0) -> Future:
        """Queue a request; the future resolves to one hit list per query (or raises the failure)."""
        request = _Request(list(queries), int(k), time.monotonic() + timeout_s)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the retrieval service is shutting down; retry against a running one")
            if self._pending >= self.max_queue:
                self._stats.rejected += 1
                raise QueueFull(
                    f"search queue is full ({self.max_queue} requests waiting); retry later", self._retry_after()
                )
            self._pending += 1
        self._queue.put(request)
        return request.future

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(**{**self._stats.__dict__, "pending": self._pending})

    def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Accept nothing more; answer what is queued (``drain``) or fail it, then end the worker."""
        with self._lock:
            self._accepting = False
        if not drain:
            self._fail_queued(ShuttingDown("the retrieval service stopped before searching this request"))
        self._queue.put(_STOP)
        self._worker.join(timeout_s)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ------------------------------------------------------------------ worker

    def _retry_after(self) -> int:
        rounds_waiting = max(1, self._pending) / max(1.0, self._stats.mean_batch_requests)
        return max(1, math.ceil(rounds_waiting * self._round_seconds))

    def _take_round(self) -> list[_Request] | None:
        """Block for one request, then take what else is queued, up to ``max_batch_queries``."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        round_, size = [first], len(first.queries)
        wait_until = time.monotonic() + self.batch_wait_s
        while size < self.max_batch_queries:
            try:
                remaining = wait_until - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or size + len(item.queries) > self.max_batch_queries:
                self._carry = item  # next round (or the stop marker, after this round is answered)
                break
            round_.append(item)
            size += len(item.queries)
        return round_

    def _run(self) -> None:
        while (round_ := self._take_round()) is not None:
            with self._lock:
                self._pending -= len(round_)
            started = time.monotonic()
            try:
                self._answer(round_)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any round's failure
                self._fail_round(round_, err)
            elapsed = time.monotonic() - started
            self._round_seconds = elapsed if not self._round_seconds else 0.8 * self._round_seconds + 0.2 * elapsed

    def _answer(self, round_: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for request in round_:
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller gave up (timeout, disconnect)
            if now > request.deadline:
                request.future.set_exception(RequestExpired("the request waited in the search queue past its timeout"))
                self._count(expired=1)
                continue
            live.append(request)
        by_k: dict[int, list[_Request]] = {}
        for request in live:
            by_k.setdefault(request.k, []).append(request)
        for k, group in by_k.items():
            unique = list(dict.fromkeys(q for request in group for q in request.queries))
            try:
                hits = self.retriever.search(unique, k)
            except Exception as err:  # noqa: BLE001 - isolate the failing request below
                if len(group) == 1:
                    group[0].future.set_exception(err)
                    self._count(failed=1)
                else:  # one round trip per request: only the culprit fails
                    for request in group:
                        self._answer_alone(request, k)
                continue
            if len(hits) != len(unique):
                error = RetrievalError(f"{type(self.retriever).__name__}.search returned {len(hits)} hit lists "
                                       f"for {len(unique)} queries")
                for request in group:
                    request.future.set_exception(error)
                self._count(failed=len(group))
                continue
            found = dict(zip(unique, hits))
            for request in group:
                request.future.set_result([list(found[q]) for q in request.queries])
            self._count(requests=len(group), queries=sum(len(r.queries) for r in group),
                        batches=1, searched_queries=len(unique))

    def _answer_alone(self, request: _Request, k: int) -> None:
        try:
            result = self.retriever.search(request.queries, k)
        except Exception as err:  # noqa: BLE001 - the caller turns it into a 503
            request.future.set_exception(err)
            self._count(failed=1)
            return
        if len(result) != len(request.queries):
            request.future.set_exception(RetrievalError(
                f"{type(self.retriever).__name__}.search returned {len(result)} hit lists "
                f"for {len(request.queries)} queries"))
            self._count(failed=1)
            return
        request.future.set_result(result)
        self._count(requests=1, queries=len(request.queries), batches=1, searched_queries=len(request.queries))

    def _fail_round(self, round_: list[_Request], error: Exception) -> None:
        """Fail the round's unanswered futures with ``error`` (an unexpected bug, not a search failure)."""
        for request in round_:
            if request.future.done():
                continue
            if request.future.running() or request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)
                self._count(failed=1)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item.future.set_running_or_notify_cancel():
                item.future.set_exception(error)
            with self._lock:
                self._pending -= item is not _STOP
