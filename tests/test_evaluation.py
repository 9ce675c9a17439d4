"""EvalAccumulator: overall, per-dataset and per-hop EM/F1 against hand counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stepsearch.data.schema import Example, SubQuestion
from stepsearch.evaluation.loop import EvalAccumulator
from training_fixtures import _one_thread, rollout_config, training_env  # noqa: F401  (fixtures)


def _example(i: int, hops: int, answer: str, dataset: str = "synthetic") -> Example:
    subs = [SubQuestion(question=f"q{i}-{h}", answer=f"a{h}") for h in range(hops)]
    return Example(id=str(i), question=f"q{i}", answers=[answer], dataset=dataset, sub_questions=subs)


def _update(acc, examples, predictions):
    scores = [SimpleNamespace(answer=p, global_score=1.0 if p == ex.answers[0] else 0.0, format_ok=p is not None,
                              answer_f1=0.5 if p is not None else 0.0)
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
    assert out["val/answer_f1"] == pytest.approx(3 * 0.5 / 4)


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


# ---------------------------------------------------------------- one answer extraction
PROTOCOL = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>")


@pytest.mark.parametrize(
    "text, valid, answer",
    [
        # an <answer> opened, abandoned for a search, and a real answer later (the case)
        ("<think> hmm </think> <answer> x </think> <search> Galdresse </search>"
         "<information> Doc 1 </information><answer> Galdresse </answer>", True, "Galdresse"),
        ("<answer> a <search> q </search> b </answer>", False, None),  # protocol tags inside: no answer
        ("<answer> a </think> b </answer>", False, None),
        ("<answer> <answer> Rome </answer>", True, "Rome"),  # the innermost tag-free block
        ("<answer> Oslo </answer> <search> q </search>", False, "Oslo"),  # text after the answer: gate fails
        ("<answer> 3 < 4 </answer>", True, "3 < 4"),  # a '<' that is no tag is answer text
    ],
)
def test_gate_and_extraction_agree_on_a_valid_answer(text, valid, answer):
    from stepsearch.rewards import extract_answer, is_valid_format
    from stepsearch.rollout import template as tpl

    assert is_valid_format(text) is valid
    assert extract_answer(text) == answer
    assert tpl.extract_answer(text) == answer  # the engine's record.answer uses the same definition
    if answer is not None:
        assert not any(tag in answer for tag in PROTOCOL)


@pytest.fixture(scope="module")
def galdresse_engine(training_env):
    """A scripted policy that opens an <answer>, searches instead, then answers: (engine, examples)."""
    from stepsearch.data.sources import load_examples
    from stepsearch.models.loading import load_tokenizer
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.scripted import ScriptedPolicy

    tokenizer = load_tokenizer(training_env.sft_dir)
    examples = load_examples(training_env.val)[:2]
    gold = examples[0].answers[0]
    scripts = [(examples[0].question, [f"<think> hmm </think> <answer> x </think> <search> {gold} </search>",
                                       f"<answer> {gold} </answer>"]),
               (examples[1].question, ["<answer> nobody </answer>"])]
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, scripts), tokenizer, training_env.retriever, rollout_config())
    return engine, examples


def test_record_score_and_prediction_rows_report_one_answer(galdresse_engine):
    from stepsearch.evaluation.loop import evaluate_examples, prediction_rows, rollout_and_score
    from stepsearch.rewards import RewardConfig

    engine, examples = galdresse_engine
    gold = examples[0].answers[0]
    trajectory, scores = rollout_and_score(engine, examples, RewardConfig())
    assert trajectory.records[0].answer == scores[0].answer == gold and scores[0].format_ok
    assert [s.query for s in trajectory.records[0].steps] == [gold]
    rows = prediction_rows(examples, trajectory, scores)
    assert rows[0]["prediction"] == gold and rows[0]["em"] == 1.0
    assert rows[0]["searches"][0]["ids"] == trajectory.records[0].steps[0].passage_ids
    assert rows[1]["prediction"] == "nobody" and rows[1]["searches"] == []
    acc, evaluated = evaluate_examples(engine, examples, RewardConfig(), batch_size=1)
    assert [r["prediction"] for r in evaluated] == [r["prediction"] for r in rows]
    em = sum(r["em"] for r in evaluated) / len(evaluated)
    assert acc.compute("eval")["eval/em"] == pytest.approx(em)


def test_methods_run_on_the_one_engine(galdresse_engine):
    """agent is the engine itself; direct/rag are baselines on it (tests/test_baselines.py: their prompts)."""
    from stepsearch.evaluation.loop import Baseline, method_engine

    engine, _ = galdresse_engine
    assert method_engine("agent", engine) is engine
    for method in ("direct", "rag"):
        runner = method_engine(method, engine)
        assert isinstance(runner, Baseline) and runner.engine is engine and runner.method == method
    with pytest.raises(Exception, match="unknown evaluation method 'oracle'"):
        method_engine("oracle", engine)
