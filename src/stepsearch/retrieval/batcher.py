"""Cross-request micro-batching: one worker thread owns the retriever and answers queued requests.

The retrieval service receives many small requests at once (every rollout worker, every rank of a
training run). Calling the retriever from each server thread is both unsafe (Pyserini's Java
objects are reached through pyjnius, which is not thread-safe: concurrent calls failed with
``NullPointerException``) and slow (a batch of 512 queries costs far less than 512 single calls:
Lucene's ``batch_search`` runs a Java thread pool, a dense encoder fills its matrix multiplies).

:class:`SearchBatcher` puts every request in a bounded FIFO queue; a single worker takes all that
is waiting (up to ``max_batch_queries`` queries), groups it by ``k``, drops duplicate queries, runs
one ``search`` call per group and hands each request its own slice. A request larger than
``max_batch_queries`` (Search-R1's recipe sends 2,560 queries in one POST) runs alone, searched in
chunks of ``max_batch_queries``. A full queue refuses at once (:class:`QueueFull`, the service's
503 + ``Retry-After``), a request that waited past its deadline is not searched
(:class:`RequestExpired`), and ``stop(drain=True)`` answers what was accepted before the worker exits
(graceful shutdown). If a merged search fails, each request of the group is retried alone, so one
request's failure never fails the others.

Counters say what callers got: a caller that stops waiting (its timeout, the service's 504) calls
:meth:`SearchBatcher.abandon`, which counts the request ``expired`` once and takes it out of
``pending`` at once, even while it still sits in the queue; the worker later skips it, or, if it was
already being searched, drops the result without counting it as answered.
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


class SearchFuture(Future):
    """The future of one request, with the bookkeeping the counters need (guarded by the batcher lock):
    ``queued`` until the worker takes it or the caller abandons it, ``abandoned`` once the caller
    stopped waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = True
        self.abandoned = False


@dataclass
class _Request:
    queries: list[str]
    k: int
    deadline: float
    future: SearchFuture = field(default_factory=SearchFuture)


@dataclass
class BatcherStats:
    """Counters since start; ``pending`` is now (requests queued whose callers still wait)."""

    requests: int = 0  # answered with hit lists
    queries: int = 0  # queries of the answered requests
    batches: int = 0  # search calls
    searched_queries: int = 0  # after de-duplication inside batches
    rejected: int = 0  # refused at once: queue full
    expired: int = 0  # timed out: past the deadline in the queue, or abandoned by their caller
    failed: int = 0  # the search raised or answered the wrong shape
    pending: int = 0

    @property
    def mean_batch_requests(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class SearchBatcher:
    """Serialize and micro-batch ``retriever.search`` calls from many threads (see module docstring).

    Args:
        retriever: any :class:`Retriever`; only the worker thread calls it.
        max_queue: requests waiting at most; one more raises :class:`QueueFull`.
        max_batch_queries: queries merged into one round, and searched in one call, at most (a larger
            request runs alone, in chunks of this size).
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
        self._lock = threading.RLock()  # futures are settled under it; their callbacks may read stats
        self._pending = 0
        self._accepting = True
        self._stats = BatcherStats()
        self._round_seconds = 0.0  # moving average of one round's duration, for Retry-After
        self._carry: _Request | None = None
        self._worker = threading.Thread(target=self._run, name="stepsearch-search-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ callers

    def submit(self, queries: list[str], k: int, timeout_s: float = 30.0) -> SearchFuture:
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

    def abandon(self, future: SearchFuture) -> bool:
        """The caller stops waiting for ``future``: count it expired and out of ``pending`` (once).

        Returns False when the future already has its outcome (the caller should use it instead).
        """
        with self._lock:
            if future.abandoned:
                return True
            if future.done():
                return False
            future.abandoned = True
            future.cancel()  # fails while it is being searched: then the worker drops its result
            self._stats.expired += 1
            self._leave_queue(future)
            return True

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

    def _leave_queue(self, future: SearchFuture) -> None:
        """Count a request out of ``pending`` (once); hold ``self._lock``."""
        if future.queued:
            future.queued = False
            self._pending -= 1

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
            if item is not _STOP and item.future.cancelled():
                with self._lock:
                    self._leave_queue(item.future)  # abandoned while queued: nothing to search
                continue
            if item is _STOP or size + len(item.queries) > self.max_batch_queries:
                self._carry = item  # next round (or the stop marker, after this round is answered)
                break
            round_.append(item)
            size += len(item.queries)
        return round_

    def _run(self) -> None:
        while (round_ := self._take_round()) is not None:
            with self._lock:
                for request in round_:
                    self._leave_queue(request.future)
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
                continue  # abandoned by its caller: counted by abandon()
            if now > request.deadline:
                self._settle(request, error=RequestExpired("the request waited in the search queue past its timeout"),
                             counter="expired")
                continue
            live.append(request)
        by_k: dict[int, list[_Request]] = {}
        for request in live:
            by_k.setdefault(request.k, []).append(request)
        for k, group in by_k.items():
            unique = list(dict.fromkeys(q for request in group for q in request.queries))
            try:
                hits = self._search_chunked(unique, k)
            except Exception as err:  # noqa: BLE001 - isolate the failing request below
                if len(group) == 1:
                    self._settle(group[0], error=err, counter="failed")
                else:  # one round trip per request: only the culprit fails
                    for request in group:
                        self._answer_alone(request, k)
                continue
            found = dict(zip(unique, hits))
            for request in group:
                self._settle(request, result=[list(found[q]) for q in request.queries])
            self._count(searched_queries=len(unique))

    def _search_chunked(self, queries: list[str], k: int) -> list:
        """``retriever.search`` in calls of at most ``max_batch_queries`` queries; checks the answer's length."""
        hits: list = []
        for start in range(0, len(queries), self.max_batch_queries):
            chunk = queries[start : start + self.max_batch_queries]
            answer = self.retriever.search(chunk, k)
            self._count(batches=1)
            if len(answer) != len(chunk):
                raise RetrievalError(f"{type(self.retriever).__name__}.search returned {len(answer)} hit lists "
                                     f"for {len(chunk)} queries")
            hits.extend(answer)
        return hits

    def _answer_alone(self, request: _Request, k: int) -> None:
        try:
            result = self._search_chunked(request.queries, k)
        except Exception as err:  # noqa: BLE001 - the caller turns it into a 503
            self._settle(request, error=err, counter="failed")
            return
        self._settle(request, result=result)
        self._count(searched_queries=len(request.queries))

    def _settle(self, request: _Request, result: list | None = None, error: Exception | None = None,
                counter: str = "failed") -> None:
        """Give ``request`` its outcome and count it, unless its caller abandoned it (counted then)."""
        with self._lock:
            future = request.future
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
            if future.abandoned:
                return
            if error is not None:
                setattr(self._stats, counter, getattr(self._stats, counter) + 1)
            else:
                self._stats.requests += 1
                self._stats.queries += len(request.queries)

    def _fail_round(self, round_: list[_Request], error: Exception) -> None:
        """Fail the round's unanswered futures with ``error`` (an unexpected bug, not a search failure)."""
        for request in round_:
            if request.future.done():
                continue
            if request.future.running() or request.future.set_running_or_notify_cancel():
                self._settle(request, error=error, counter="failed")

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
            if item is _STOP:
                continue
            with self._lock:
                self._leave_queue(item.future)
            if item.future.set_running_or_notify_cancel():
                self._settle(item, error=error, counter="failed")
