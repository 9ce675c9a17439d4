"""RetrieverConfig → retriever: kinds, build-on-first-use from a corpus, cache wrapping, errors."""

from __future__ import annotations

import json

import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Retriever
from stepsearch.retrieval.bm25 import BM25Retriever
from stepsearch.retrieval.cache import CachedRetriever
from stepsearch.retrieval.client import HttpRetriever
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever, load_retriever
from stepsearch.retrieval.index import META_FILE


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "world.jsonl"
    rows = [
        {"id": "w1", "contents": '"Zorblat"\nZorblat is the capital of Quenvia.'},
        {"id": "w2", "contents": '"Quenvia"\nQuenvia is a kingdom ruled by Queen Arvela.'},
        {"id": "w3", "title": "Arvela", "text": "Queen Arvela was born in Mistport."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_builds_index_from_corpus_on_first_use(tmp_path, small_corpus):
    index = tmp_path / "idx"
    config = RetrieverConfig(kind="bm25", index=str(index), corpus=str(small_corpus))
    retriever = build_retriever(config)
    assert isinstance(retriever, BM25Retriever) and isinstance(retriever, Retriever)
    hits = retriever.search(["capital of Quenvia", "where was Arvela born"], 1)
    assert [h[0].id for h in hits] == ["w1", "w3"]
    assert (hits[1][0].title, hits[1][0].text) == ("Arvela", "Queen Arvela was born in Mistport.")
    stamp = (index / META_FILE).stat().st_mtime_ns
    build_retriever(config)
    assert (index / META_FILE).stat().st_mtime_ns == stamp  # an existing index is not rebuilt


def test_cache_and_bm25_parameters(bm25_index):
    retriever = build_retriever(RetrieverConfig(index=str(bm25_index), cache_size=16, bm25_k1=1.2, bm25_b=0.75))
    assert isinstance(retriever, CachedRetriever) and retriever.max_size == 16
    assert (retriever.inner.k1, retriever.inner.b) == (1.2, 0.75)
    retriever.search(["Neil Peart"], 2)
    retriever.search(["Neil Peart"], 2)
    assert (retriever.hits, retriever.misses) == (1, 1)


def test_http_config():
    retriever = build_retriever(RetrieverConfig(kind="http", url="http://127.0.0.1:9", timeout_s=1.5, max_retries=0))
    assert isinstance(retriever, HttpRetriever)
    assert (retriever.url, retriever.timeout_s, retriever.max_retries) == ("http://127.0.0.1:9/retrieve", 1.5, 0)


@pytest.mark.parametrize(
    "config,message",
    [
        (RetrieverConfig(kind="sparse"), "unknown retriever kind 'sparse'"),
        (RetrieverConfig(kind="http"), "needs a service URL"),
        (RetrieverConfig(kind="bm25"), "needs an index directory"),
        (RetrieverConfig(kind="bm25", index="/nonexistent/stepsearch-index"), "index directory not found"),
        (RetrieverConfig(kind="bm25", index="x", cache_size=-1), "cache_size must be an integer >= 0"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(RetrievalError, match=message):
        build_retriever(config)


def test_load_retriever_detects_kind(bm25_index):
    retriever = load_retriever(bm25_index, threads=1)
    assert isinstance(retriever, BM25Retriever) and retriever.threads == 1
