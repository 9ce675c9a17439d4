"""Retrieval for turn loops that do not wait for each other (``rollout.independent_turns``).

Rows hand their searches to :class:`RetrievalQueue`; its worker thread runs ONE ``retriever.search``
call over every query waiting when it frees up, so searches that coincide are still batched while
the generating thread keeps decoding the other rows.
"""

from __future__ import annotations

import threading
import time

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.base import Passage, Retriever


def search_checked(retriever: Retriever, queries: list[str], top_k: int) -> list[list[Passage]]:
    results = retriever.search(queries, top_k)
    if len(results) != len(queries):
        raise StepSearchError(f"the retriever returned {len(results)} result lists for {len(queries)} queries")
    return results


class RetrievalQueue:
    """Searches on one worker thread: every query waiting when the worker frees up goes into ONE
    ``retriever.search`` call, so rows whose searches coincide are still batched. Retrievers are
    thread-safe (Pyserini calls hold the JVM lock; dense and HTTP retrievers share nothing mutable)."""

    def __init__(self, retriever: Retriever, top_k: int):
        self.retriever, self.top_k = retriever, top_k
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, str]] = []
        self._found: list[tuple[int, list[Passage]]] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.calls, self.busy_s = 0, 0.0

    def close(self) -> None:
        """Drop what is waiting and end the worker (after the search it is running, whose result is dropped)."""
        with self._cond:
            self._closed = True
            self._waiting = []
            self._cond.notify_all()

    def put(self, key: int, query: str) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the retrieval queue is closed")
            self._waiting.append((key, query))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="stepsearch-retrieval", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, block: bool) -> list[tuple[int, list[Passage]]]:
        """The searches finished so far (``block``: wait for at least one)."""
        with self._cond:
            while block and not self._found and self._error is None:
                self._cond.wait()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            found, self._found = self._found, []
            return found

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._waiting = self._waiting, []
            start = time.perf_counter()
            try:
                results = search_checked(self.retriever, [query for _, query in batch], self.top_k)
            except BaseException as error:  # handed to the generating thread, raised there
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                continue
            with self._cond:
                self.calls += 1
                self.busy_s += time.perf_counter() - start
                self._found.extend((key, passages) for (key, _), passages in zip(batch, results))
                self._cond.notify_all()
