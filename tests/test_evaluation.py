"""EvalAccumulator: overall, per-dataset and per-hop EM/F1 against hand counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stepsearch.data.schema import Example, SubQuestion
from stepsearch.evaluation import EvalAccumulator


def _example(i: int, hops: int, answer: str, dataset: str = "synthetic") -> Example:
    subs = [SubQuestion(question=f"q{i}-{h}", answer=f"a{h}") for h in range(hops)]
    return Example(id=str(i), question=f"q{i}", answers=[answer], dataset=dataset, sub_questions=subs)


def _update(acc, examples, predictions):
    scores = [SimpleNamespace(answer=p, global_score=1.0 if p == ex.answers[0] else 0.0, format_ok=p is not None)
              for ex, p in zip(examples, predictions)]
    records = [SimpleNamespace(steps=[None] * len(ex.sub_questions)) for ex in examples]
    acc.update(examples, SimpleNamespace(records=records), scores)


def test_per_hop_and_per_dataset_metrics():
    acc = EvalAccumulator()
    examples = [_example(0, 1, "Paris"), _example(1, 1, "Rome"), _example(2, 2, "Oslo big"),
                _example(3, 3, "Bern", dataset="other")]
    # hop 1: one right, one wrong; hop 2: half the tokens; hop 3: no answer at all
    _update(acc, examples, ["paris", "Milan", "Oslo", None])
    out = acc.compute("val")
    assert out["val/em"] == pytest.approx(1 / 4)
    assert out["val/f1"] == pytest.approx((1 + 0 + 2 / 3 + 0) / 4)
    assert out["val/hops_1/em"] == pytest.approx(0.5) and out["val/hops_1/f1"] == pytest.approx(0.5)
    assert out["val/hops_2/em"] == 0.0 and out["val/hops_2/f1"] == pytest.approx(2 / 3)
    assert out["val/hops_3/em"] == 0.0
    assert out["val/synthetic/em"] == pytest.approx(1 / 3) and out["val/other/em"] == 0.0
    assert out["val/searches"] == pytest.approx((1 + 1 + 2 + 3) / 4)
    assert out["val/format_ok"] == pytest.approx(3 / 4)


def test_single_hop_count_adds_no_per_hop_keys():
    acc = EvalAccumulator()
    _update(acc, [_example(0, 2, "x"), _example(1, 2, "y")], ["x", "z"])
    out = acc.compute("val")
    assert out["val/em"] == pytest.approx(0.5)
    assert not [k for k in out if "hops_" in k]


def test_accumulator_moves_its_metric_states():
    acc = EvalAccumulator()
    _update(acc, [_example(0, 1, "x"), _example(1, 2, "y")], ["x", "z"])
    acc.to("meta")
    states = [getattr(m, name) for m in acc._metrics() for name in m._defaults]
    assert states and {t.device.type for t in states} == {"meta"}
    acc.reset()
    assert {t.device.type for m in acc._metrics() for t in (getattr(m, n) for n in m._defaults)} == {"meta"}
