"""Information gain (TF-IDF vs scikit-learn, telescoping, dense option) and redundancy (§2e, §2f)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stepsearch.evaluation.metrics import normalize_answer
from stepsearch.retrieval.base import split_contents
from stepsearch.rewards import (
    dense_similarity,
    information_gains,
    redundancy_penalties,
    tfidf_similarity,
)
from stepsearch.rollout.trajectory import SearchStep


@pytest.fixture(scope="module")
def corpus_bodies(corpus_path):
    bodies = []
    with open(corpus_path, encoding="utf-8") as f:
        for line in f:
            bodies.append(split_contents(json.loads(line)["contents"])[1])
            if len(bodies) == 60:
                break
    return bodies


def released_similarity(doc: str, golds: list[str]) -> np.ndarray:
    """The released per-pair computation: one TfidfVectorizer() fitted on [d] + G (normalised texts)."""
    doc = normalize_answer(doc)
    golds = [normalize_answer(g) for g in golds]
    if doc == "":
        return np.zeros(len(golds))
    matrix = TfidfVectorizer().fit_transform([doc] + golds)
    return np.maximum(cosine_similarity(matrix[0], matrix[1:]).ravel(), 0.0)


def test_tfidf_matches_sklearn_per_pair_on_real_passages(corpus_bodies):
    golds = corpus_bodies[:4]
    docs = corpus_bodies[4:40] + [golds[1], "", "a an the", "x y z", golds[0] + " " + golds[2], "THE Drummer!!"]
    ours = tfidf_similarity(docs, golds)
    assert ours.shape == (len(docs), len(golds))
    reference = np.stack([released_similarity(d, golds) for d in docs])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)
    assert ours[len(docs) - 6, 1] == pytest.approx(1.0, abs=1e-12)  # a golden paragraph retrieved verbatim
    assert np.all(ours >= 0) and (ours > 0.05).any()


def test_sklearn_defaults_are_what_we_model():
    vec = TfidfVectorizer()
    assert vec.smooth_idf and not vec.sublinear_tf and vec.norm == "l2" and vec.use_idf
    assert vec.token_pattern == r"(?u)\b\w\w+\b" and vec.lowercase


def test_tfidf_hand_value():
    # N = 2 documents; idf(apple) = ln(3/3) + 1 = 1, idf(banana) = idf(cherry) = ln(3/2) + 1 = c
    # x = (1, c, 0)/sqrt(1 + c²), y = (1, 0, c)/sqrt(1 + c²) -> cos = 1/(1 + c²)
    c = math.log(1.5) + 1
    sim = tfidf_similarity(["Apple, banana."], ["the apple cherry"])
    assert sim[0, 0] == pytest.approx(1 / (1 + c * c), abs=1e-12)
    assert tfidf_similarity([], ["x"]).shape == (0, 1)
    assert tfidf_similarity(["a b"], ["c d"])[0, 0] == 0.0  # no token of ≥ 2 characters anywhere


def test_information_gain_hand_example_and_telescoping():
    sims = np.array([[0.2, 0.0], [0.5, 0.1], [0.4, 0.6], [0.9, 0.6]])
    step_of_doc = [0, 0, 1, 3]  # step 2 retrieved nothing
    gains = information_gains(sims, step_of_doc, 4)
    # c0=(.5,.1): IG=(.5+.1)/2; c1=(.4,.6): (0+.5)/2; c2=0: 0; c3=(.9,.6): (.4+0)/2
    np.testing.assert_allclose(gains, [0.3, 0.25, 0.0, 0.2], atol=1e-15)
    memory_final = sims.max(axis=0)
    assert gains.sum() == pytest.approx(memory_final.mean(), abs=1e-15)
    assert information_gains(np.zeros((0, 0)), [], 2).tolist() == [0.0, 0.0]


def test_telescoping_on_real_passages(corpus_bodies):
    golds = corpus_bodies[:3]
    rng = np.random.default_rng(0)
    docs = [corpus_bodies[i] for i in rng.integers(0, 30, size=15)]
    step_of_doc = np.repeat(np.arange(5), 3)
    sims = tfidf_similarity(docs, golds)
    gains = information_gains(sims, step_of_doc, 5)
    assert np.all(gains >= 0)
    assert gains.sum() == pytest.approx(sims.max(axis=0).mean(), abs=1e-12)
    assert gains.sum() <= 1.0 + 1e-12


def test_dense_similarity_uses_embed_once_and_clips():
    calls = []
    table = {"d1": [1.0, 0.0], "d2": [0.0, 2.0], "d3": [-1.0, 0.0], "g1": [3.0, 4.0], "g2": [1.0, 1.0]}

    def embed(texts):
        calls.append(list(texts))
        return np.array([table[t] for t in texts])

    sim = dense_similarity(["d1", "d2", "d3", "d1"], ["g1", "g2"], embed)
    expected = np.array(
        [[0.6, 1 / math.sqrt(2)], [0.8, 1 / math.sqrt(2)], [0.0, 0.0], [0.6, 1 / math.sqrt(2)]]
    )
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    assert len(calls) == 1 and sorted(calls[0]) == ["d1", "d2", "d3", "g1", "g2"]  # deduplicated


def _step(ids, texts, end=0):
    return SearchStep(query="q", passage_ids=ids, passage_titles=[""] * len(texts), passage_texts=texts, end_index=end)


def test_redundancy_by_id_within_and_across_steps():
    steps = [
        _step(["a", "b", "a"], ["A", "B", "A again"]),  # duplicate id within the step: 1/3
        _step(["b", "c", "d"], ["B", "C", "D"]),  # b seen: 1/3
        _step(["a", "b", "c"], ["x", "y", "z"]),  # all seen by id, texts differ: 1
        _step([], []),  # empty step: 0
    ]
    assert redundancy_penalties(steps) == pytest.approx([1 / 3, 1 / 3, 1.0, 0.0])


def test_redundancy_by_text_when_ids_missing():
    steps = [
        _step(["", ""], ["same text", "other"]),
        _step(["", "", ""], ["same text", "new", "new"]),  # 'same text' earlier, 'new' twice in-step
        _step(["p1"], ["same text"]),  # has an id: identified by id, not by text -> new
    ]
    assert redundancy_penalties(steps) == pytest.approx([0.0, 2 / 3, 0.0])
