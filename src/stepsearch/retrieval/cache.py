"""An in-memory LRU cache of search results, in front of any retriever.

Rollouts repeat queries a lot (the same question is sampled ``n`` times per prompt, and policies
re-issue identical searches), so a small cache saves most retriever calls. Keys are ``(query, k)``
exactly as given: different spellings are different keys. Misses of one batch, deduplicated, go to
the inner retriever in a single call so BM25/dense batching still applies. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Passage, Retriever, check_search_args
from stepsearch.retrieval.server import describe_retriever


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`CachedRetriever`: lookups served from the cache, and those that were not."""

    hits: int
    misses: int
    size: int
    max_size: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class CachedRetriever:
    """``CachedRetriever(inner, max_size)``: LRU keyed by ``(query, k)``, with hit/miss counters."""

    def __init__(self, inner: Retriever, max_size: int = 10_000) -> None:
        if not isinstance(max_size, int) or max_size <= 0:
            raise RetrievalError(f"cache max_size must be a positive integer, got {max_size!r}")
        self.inner, self.max_size = inner, max_size
        self._entries: OrderedDict[tuple[str, int], tuple[Passage, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        check_search_args(queries, k)
        results: list[tuple[Passage, ...] | None] = [None] * len(queries)
        to_fetch: dict[str, list[int]] = {}
        with self._lock:
            for position, query in enumerate(queries):
                cached = self._entries.get((query, k))
                if cached is not None:
                    self._entries.move_to_end((query, k))
                    results[position] = cached
                    self.hits += 1
                else:
                    to_fetch.setdefault(query, []).append(position)
                    self.misses += 1
        if to_fetch:
            fetched = self.inner.search(list(to_fetch), k)
            with self._lock:
                for (query, positions), passages in zip(to_fetch.items(), fetched):
                    frozen = tuple(passages)
                    self._entries[(query, k)] = frozen
                    self._entries.move_to_end((query, k))
                    for position in positions:
                        results[position] = frozen
                while len(self._entries) > self.max_size:
                    self._entries.popitem(last=False)
        return [list(r) for r in results]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._entries), self.max_size)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def describe(self) -> dict:
        """The inner retriever's facts plus the cache's counters (for ``/health``)."""
        stats = self.stats()
        return {**describe_retriever(self.inner), "cache": {"size": stats.size, "max_size": stats.max_size,
                                                             "hits": stats.hits, "misses": stats.misses}}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"CachedRetriever({self.inner!r}, max_size={self.max_size})"
