"""SQuAD v1.1 EM/F1 against all 99 reference cases, and the torchmetrics wrappers."""

from __future__ import annotations

import json

import pytest
import torch

from stepsearch.evaluation.metrics import ExactMatch, TokenF1, exact_match_score, f1_score, normalize_answer


@pytest.fixture(scope="module")
def metric_cases(shared_data):
    path = shared_data / "metrics" / "answer_metric_cases.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_all_reference_cases_match_squad_v11(metric_cases):
    assert len(metric_cases) == 99
    mismatches = []
    for case in metric_cases:
        ref = case["scores"]["squad_v1.1"]
        em = exact_match_score(case["prediction"], case["golds"])
        f1 = f1_score(case["prediction"], case["golds"])
        if em != ref["em"] or abs(f1 - ref["f1"]) > 1e-12:
            mismatches.append((case["case_id"], case["prediction"], case["golds"], em, f1, ref))
    assert not mismatches, mismatches


def test_normalization_matches_reference(metric_cases):
    for case in metric_cases:
        assert normalize_answer(case["prediction"]) == case["normalized_prediction"], case["case_id"]
        assert [normalize_answer(g) for g in case["golds"]] == case["normalized_golds"], case["case_id"]


def test_hand_values():
    assert normalize_answer("  The  Quick, brown-fox! ") == "quick brownfox"
    # pred {barack, obama}, gold {obama}: P = 1/2, R = 1 -> F1 = 2/3
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3, abs=1e-15)
    assert f1_score("Barack Obama", ["Obama", "Barack H. Obama"]) == pytest.approx(0.8, abs=1e-15)
    assert exact_match_score("the Beatles", "Beatles") == 1.0
    assert f1_score(None, ["x"]) == 0.0 and exact_match_score(None, ["x"]) == 0.0
    assert f1_score("x", []) == 0.0 and exact_match_score("x", []) == 0.0


def test_torchmetrics_mean_and_distributed_merge():
    preds = ["Paris", "Barack Obama", None, "new york"]
    golds = [["paris"], ["Obama"], ["x"], ["New York City", "NYC"]]
    em_expected = (1 + 0 + 0 + 0) / 4
    f1_expected = (1 + 2 / 3 + 0 + 0.8) / 4

    em, f1 = ExactMatch(), TokenF1()
    em.update(preds[:2], golds[:2])
    em.update(preds[2:], golds[2:])
    f1.update(preds, golds)
    assert em.compute().item() == pytest.approx(em_expected, abs=1e-7)
    assert f1.compute().item() == pytest.approx(f1_expected, abs=1e-7)

    # Two "ranks" each see half; summing the states (the dist reduction) gives the global mean.
    left, right = TokenF1(), TokenF1()
    left.update(preds[:1], golds[:1])
    right.update(preds[1:], golds[1:])
    left.merge_state(right)
    assert left.compute().item() == pytest.approx(f1_expected, abs=1e-7)
    assert left.count.item() == 4

    fresh = ExactMatch()
    with pytest.warns(UserWarning):  # torchmetrics warns on compute() before update()
        assert fresh.compute().item() == 0.0
    with pytest.raises(ValueError):
        fresh.update(["a"], [])
    assert isinstance(f1.compute(), torch.Tensor)
