"""FAISS index types by name: recall against a float64 brute-force reference, memory, training, mmap, GPU."""

from __future__ import annotations

import numpy as np
import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.dense import DenseRetriever, build_faiss_from_vectors
from stepsearch.retrieval.encoder import TextEncoder
from stepsearch.retrieval.faiss_index import (
    FAISS_TYPES,
    FaissSpec,
    default_nlist,
    default_pq_m,
    describe_index,
    factory_string,
    index_bytes,
    read_faiss,
    rerank,
    set_search_params,
    train_sample_rows,
    write_faiss,
)
from stepsearch.retrieval.index import build_index_from_passages, read_index_meta

DIM, COUNT, QUERIES = 64, 3000, 150


@pytest.fixture(scope="module")
def clustered():
    """Unit vectors around 30 centres (like topics), and queries near some of them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, DIM))
    vectors = centres[rng.integers(0, 30, COUNT)] + 0.6 * rng.normal(size=(COUNT, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:QUERIES] + 0.1 * rng.normal(size=(QUERIES, DIM))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]  # float64 reference
    return vectors.astype(np.float32), queries.astype(np.float32), truth, queries @ vectors.T


def _recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# (minimum recall@10 against exact search, maximum bytes per vector) on 3,000 64-d vectors;
# measured: 1.0, 1.0, 1.0, 0.99, 1.0, 0.99, 0.86, 0.76 and 256, 128, 528, 336, 271, 79, 47, 47
EXPECTED = {
    "flat": (1.0, 257), "flat-fp16": (0.99, 129), "hnsw": (0.98, 600), "hnsw-sq8": (0.95, 400),
    "ivf-flat": (0.98, 280), "ivf-sq8": (0.95, 90), "ivf-sq4": (0.75, 55), "ivf-pq": (0.65, 55),
}


@pytest.mark.parametrize("kind", FAISS_TYPES)
def test_each_type_recall_and_memory(clustered, kind):
    vectors, queries, truth, _ = clustered
    index = build_faiss_from_vectors(vectors, kind)
    set_search_params(index, nprobe=8, ef_search=64)
    _scores, found = index.search(queries, 10)
    min_recall, max_bytes = EXPECTED[kind]
    assert _recall(found, truth) >= min_recall
    assert index_bytes(index) / COUNT <= max_bytes
    assert index.ntotal == COUNT and index.d == DIM


def test_flat_scores_are_exact_inner_products(clustered):
    vectors, queries, truth, reference = clustered
    scores, found = build_faiss_from_vectors(vectors, "flat").search(queries, 10)
    assert (found == truth).mean() > 0.999  # ties aside, the exact order
    np.testing.assert_allclose(scores, np.take_along_axis(reference, found, axis=1), atol=1e-5)


def test_rerank_restores_exact_order_from_fp16_vectors(clustered):
    """IVF-PQ alone finds ~0.7 of the true top 10; re-scoring its 100 best candidates exactly finds them all."""
    vectors, queries, truth, reference = clustered
    index = build_faiss_from_vectors(vectors, FaissSpec("ivf-pq", pq_m=8))
    set_search_params(index, nprobe=8)
    assert _recall(index.search(queries, 10)[1], truth) < 0.8
    scores, rows = rerank(queries, index.search(queries, 100)[1], vectors.astype(np.float16), 10)
    assert _recall(rows, truth) >= 0.99
    np.testing.assert_allclose(scores, np.take_along_axis(reference, rows, axis=1), atol=2e-3)  # fp16 storage
    assert (np.diff(scores, axis=1) <= 0).all()
    padded = rerank(queries[:1], np.array([[5, -1, 5]]), vectors.astype(np.float16), 3)
    assert padded[1].tolist() == [[5, -1, -1]] and padded[0][0, 1] == -np.inf


def test_factory_strings_defaults_and_errors():
    assert factory_string(FaissSpec("ivf-pq"), 384, 7416) == "IVF190,PQ96"  # min(4*sqrt(n), n/39); d/4 bytes
    assert factory_string(FaissSpec("ivf-sq8", nlist=64), 384, 7416) == "IVF64,SQ8"
    assert factory_string(FaissSpec("hnsw-sq8", hnsw_m=16), 768, 10) == "HNSW16,SQ8"
    assert factory_string(FaissSpec("OPQ16,IVF8,PQ16"), 64, 1000) == "OPQ16,IVF8,PQ16"
    assert default_nlist(21_015_324) == 18336 and default_nlist(100) == 2 and default_nlist(5) == 1
    assert default_pq_m(768) == 192 and default_pq_m(100) == 25
    with pytest.raises(RetrievalError, match="unknown FAISS index type 'ivfpq': use one of flat, flat-fp16"):
        build_faiss_from_vectors(np.zeros((10, 8), np.float32), "ivfpq")
    with pytest.raises(RetrievalError, match="pq_m=7 must divide the vector dimension 64"):
        factory_string(FaissSpec("ivf-pq", pq_m=7), 64, 1000)
    with pytest.raises(RetrievalError, match="FAISS nlist must be a positive integer, got 0"):
        FaissSpec("ivf-sq8", nlist=0).check()


def test_training_sample_is_uniform_seeded_and_sorted():
    rows = train_sample_rows(FaissSpec("ivf-pq", train_size=1000, seed=3), 100_000)
    assert len(rows) == 1000 and len(set(rows.tolist())) == 1000 and (np.diff(rows) > 0).all()
    assert rows.max() > 90_000 and rows.min() < 10_000  # spread over the corpus, not its first rows
    assert (rows == train_sample_rows(FaissSpec("ivf-pq", train_size=1000, seed=3), 100_000)).all()
    assert (train_sample_rows(FaissSpec("ivf-pq", train_size=5000), 4000) == np.arange(4000)).all()


@pytest.mark.parametrize("kind", ["flat", "ivf-pq"])
def test_memory_mapped_loading_answers_the_same(clustered, tmp_path, kind):
    vectors, queries, _truth, _ = clustered
    index = build_faiss_from_vectors(vectors, kind)
    write_faiss(index, tmp_path / "x.index")
    loaded, mapped = read_faiss(tmp_path / "x.index"), read_faiss(tmp_path / "x.index", mmap=True)
    for other in (loaded, mapped):
        set_search_params(other, nprobe=8)
    set_search_params(index, nprobe=8)
    expected = index.search(queries, 10)
    for other in (loaded, mapped):
        got = other.search(queries, 10)
        assert (got[1] == expected[1]).all() and np.allclose(got[0], expected[0])
    assert describe_index(mapped)["ntotal"] == COUNT


def test_unreadable_faiss_file_is_one_line(tmp_path):
    (tmp_path / "bad.index").write_bytes(b"not a faiss index")
    with pytest.raises(RetrievalError, match="cannot read FAISS index") as info:
        read_faiss(tmp_path / "bad.index")
    assert "\n" not in str(info.value)


class MemoEncoder(TextEncoder):
    """The session's real encoder, remembering vectors so that a second build costs nothing."""

    def __init__(self, encoder):  # noqa: D107 - shares the loaded model, no second load
        self.__dict__.update(encoder.__dict__)
        self.memo = {}

    def encode(self, texts, batch_size=64, progress=None):
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, TextEncoder.encode(self, missing, batch_size)))
        if progress is not None:
            progress(len(texts))
        return np.stack([self.memo[t] for t in texts])


def test_compressed_dense_index_through_build_index(tmp_path, corpus, encoder):
    """A real corpus through `build_index`: IVF-SQ8 trained on the corpus agrees with flat at the top."""
    passages, memo = corpus.passages[:100], MemoEncoder(encoder)
    built = build_index_from_passages(passages, tmp_path / "ivf", "dense", encoder=memo, max_length=128,
                                      faiss_index=FaissSpec("ivf-sq8", nlist=2, rerank=True))
    assert (built / "rerank.f16.npy").is_file()
    meta = read_index_meta(built)
    assert meta.faiss_index == "ivf-sq8" and meta.faiss_params["faiss_class"] == "IndexIVFScalarQuantizer"
    assert meta.faiss_params["nlist"] == 2 and meta.count == 100
    compressed = DenseRetriever(built, encoder=memo, nprobe=2)
    flat = build_index_from_passages(passages, tmp_path / "flat", "dense", encoder=memo, max_length=128)
    exact = DenseRetriever(flat, encoder=memo)
    queries = ["Mountrail County capital", "Jeff Porcaro drummer", "Italian comedy film", "rock band from Canada"]
    reranked, plain = compressed.search(queries, 3), DenseRetriever(built, encoder=memo, nprobe=2, rerank_candidates=0)
    assert [[h.id for h in hs] for hs in reranked] == [[h.id for h in hs] for hs in exact.search(queries, 3)]
    for got, want in zip(reranked, exact.search(queries, 3)):  # exact scores, up to fp16 storage
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=2e-3)
    assert compressed.describe()["rerank_candidates"] == 100 and "rerank_candidates" not in plain.describe()
    assert [h[0].id for h in plain.search(queries, 1)] == [h[0].id for h in exact.search(queries, 1)]
    assert compressed.describe()["nprobe"] == 2 and compressed.describe()["faiss_class"] == "IndexIVFScalarQuantizer"


def test_gpu_flag_without_a_gpu_is_one_clear_line(dense_index, encoder):
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible: the error path does not apply")
    with pytest.raises(RetrievalError, match="faiss_gpu is set but this FAISS build sees no GPU"):
        DenseRetriever(dense_index, encoder=encoder, faiss_gpu=True)


@pytest.mark.gpu
def test_gpu_sharded_index_matches_cpu(clustered):
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("needs faiss-gpu and a CUDA device")
    from stepsearch.retrieval.faiss_index import to_gpu

    vectors, queries, truth, _ = clustered
    gpu_index = to_gpu(build_faiss_from_vectors(vectors, "flat"))
    _scores, found = gpu_index.search(queries, 10)
    assert _recall(found, truth) >= 0.99  # fp16 storage may swap near-ties
