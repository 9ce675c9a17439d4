"""Fixtures for the rollout tests: a tiny model and a real BM25 index, built once per session from a
slice of the shared corpus, and a retriever wrapper that records every batched call."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

SLICE_PASSAGES = 300


class CountingRetriever:
    """Wraps a real retriever and records the query list of every ``search`` call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], k: int):
        self.calls.append(list(queries))
        return self.inner.search(queries, k)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: small-batch matmuls with 2 OpenMP threads stall when the other core is busy.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory, corpus_path: Path) -> Path:
    path = tmp_path_factory.mktemp("rollout_corpus") / "corpus.jsonl"
    with corpus_path.open(encoding="utf-8") as src:
        path.write_text("".join(islice(src, SLICE_PASSAGES)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, corpus_slice: Path) -> Path:
    from stepsearch.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), [str(corpus_slice)])


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """(model, tokenizer) of the tiny Qwen2 policy (tags are single tokens)."""
    from stepsearch.models.loading import load_policy

    return load_policy(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def multitoken_tokenizer(tmp_path_factory, corpus_slice: Path):
    """A tokenizer in which the tags are several tokens each, as in real tokenizers."""
    from stepsearch.models.loading import load_tokenizer
    from stepsearch.models.tiny import make_tiny_model

    out = make_tiny_model(tmp_path_factory.mktemp("tiny_multitoken"), [str(corpus_slice)], add_tag_tokens=False,
                          hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return load_tokenizer(out)


@pytest.fixture(scope="session")
def bm25(tmp_path_factory, corpus_slice: Path):
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    index_dir = build_index(corpus_slice, tmp_path_factory.mktemp("rollout_bm25") / "index", kind="bm25",
                            show_progress=False)
    retriever = BM25Retriever(index_dir)
    yield retriever
    retriever.close()


@pytest.fixture()
def retriever(bm25) -> CountingRetriever:
    return CountingRetriever(bm25)
