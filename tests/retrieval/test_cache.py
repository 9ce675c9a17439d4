"""LRU query cache in front of the real BM25 retriever: hits, misses, eviction, batching of misses."""

from __future__ import annotations

import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.cache import CachedRetriever


class CountingRetriever:
    """The real BM25 retriever, recording every batch it is asked for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return self.inner.search(queries, k)


def test_hits_misses_and_batched_misses(bm25_retriever):
    counting = CountingRetriever(bm25_retriever)
    cache = CachedRetriever(counting, max_size=10)
    queries = ["Jeff Porcaro drummer", "Neil Peart", "Jeff Porcaro drummer"]
    first = cache.search(queries, 3)
    assert counting.calls == [(["Jeff Porcaro drummer", "Neil Peart"], 3)]  # one call, deduplicated
    assert first == bm25_retriever.search(queries, 3)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.size) == (0, 3, 2)

    second = cache.search(["Neil Peart", "Keith Moon"], 3)
    assert counting.calls[-1] == (["Keith Moon"], 3)
    assert second[0] == first[1]
    assert (cache.hits, cache.misses) == (1, 4)
    assert cache.stats().hit_rate == pytest.approx(1 / 5)

    cache.search(["Neil Peart"], 5)  # another k is another key
    assert counting.calls[-1] == (["Neil Peart"], 5)


def test_lru_eviction_order(bm25_retriever):
    counting = CountingRetriever(bm25_retriever)
    cache = CachedRetriever(counting, max_size=2)
    cache.search(["alpha"], 1)
    cache.search(["beta"], 1)
    cache.search(["alpha"], 1)  # alpha is now the most recent
    cache.search(["gamma"], 1)  # evicts beta
    assert len(cache) == 2
    n_calls = len(counting.calls)
    cache.search(["alpha"], 1)
    assert len(counting.calls) == n_calls
    cache.search(["beta"], 1)
    assert counting.calls[-1] == (["beta"], 1)


def test_results_are_not_shared_mutable_lists(bm25_retriever):
    cache = CachedRetriever(bm25_retriever, max_size=4)
    hits = cache.search(["Neil Peart"], 2)[0]
    hits.clear()
    assert len(cache.search(["Neil Peart"], 2)[0]) == 2


def test_bad_arguments(bm25_retriever):
    with pytest.raises(RetrievalError, match="max_size must be a positive integer"):
        CachedRetriever(bm25_retriever, 0)
    cache = CachedRetriever(bm25_retriever, 3)
    with pytest.raises(RetrievalError, match="query at position 0 is empty"):
        cache.search([""], 3)
    assert cache.stats().misses == 0
