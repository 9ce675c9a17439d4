"""Session fixtures for the retrieval tests: indexes built once from the shared corpus.

``bm25_index`` (the whole 7,416-passage corpus) and ``dense_index`` (the 20 paragraphs of each of
the first MuSiQue dev questions: supporting ones plus their hard distractors) are built once per
test session in a temporary directory. Other test areas that need a small index of their own can
call ``stepsearch.retrieval.index.build_index_from_passages`` (about a second for BM25).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stepsearch.retrieval.corpus import read_corpus, write_corpus
from stepsearch.retrieval.index import build_index
from stepsearch.retrieval.recall import PassageLookup, load_raw_rows, musique_subquestion_queries

DENSE_QUESTIONS = 15  # x 20 paragraphs = 300 passages: ~10 s to encode on 2 CPU cores
DENSE_MAX_LENGTH = 128


@pytest.fixture(scope="session")
def corpus(corpus_path: Path):
    return read_corpus(corpus_path)


@pytest.fixture(scope="session")
def lookup(corpus) -> PassageLookup:
    return PassageLookup(corpus.passages)


@pytest.fixture(scope="session")
def musique_rows(raw_dir: Path) -> list[dict]:
    return load_raw_rows(raw_dir / "musique_ans_dev_sample.jsonl")


@pytest.fixture(scope="session")
def hotpot_rows(raw_dir: Path) -> list[dict]:
    return load_raw_rows(raw_dir / "hotpot_dev_distractor_sample.json")


@pytest.fixture(scope="session")
def musique_queries(musique_rows, lookup):
    return musique_subquestion_queries(musique_rows, lookup)


@pytest.fixture(scope="session")
def bm25_index(tmp_path_factory, corpus_path: Path) -> Path:
    """A BM25 (Lucene) index of the whole shared corpus."""
    return build_index(corpus_path, tmp_path_factory.mktemp("bm25") / "index", "bm25", show_progress=False)


@pytest.fixture(scope="session")
def bm25_retriever(bm25_index: Path):
    from stepsearch.retrieval.bm25 import BM25Retriever

    return BM25Retriever(bm25_index, threads=2)


@pytest.fixture(scope="session")
def dense_subset(musique_rows, lookup) -> tuple[list[dict], set[str]]:
    """(MuSiQue rows, corpus ids of all their paragraphs) for the dense tests."""
    rows = musique_rows[:DENSE_QUESTIONS]
    ids = {lookup.find(p["title"], p["paragraph_text"]) for row in rows for p in row["paragraphs"]}
    ids.discard(None)
    return rows, ids


@pytest.fixture(scope="session")
def dense_index(tmp_path_factory, dense_subset, corpus) -> Path:
    """A dense (FAISS flat, packaged MiniLM) index of the paragraphs of the first MuSiQue questions."""
    _rows, ids = dense_subset
    path = tmp_path_factory.mktemp("dense-corpus") / "subset.jsonl"
    write_corpus([p for p in corpus.passages if p.id in ids], path)
    return build_index(
        path, tmp_path_factory.mktemp("dense") / "index", "dense", show_progress=False, max_length=DENSE_MAX_LENGTH
    )


@pytest.fixture(scope="session")
def encoder():
    from stepsearch.retrieval.encoder import TextEncoder

    return TextEncoder(max_length=DENSE_MAX_LENGTH)


@pytest.fixture(scope="session")
def dense_retriever(dense_index: Path, encoder):
    from stepsearch.retrieval.dense import DenseRetriever

    return DenseRetriever(dense_index, encoder=encoder)
