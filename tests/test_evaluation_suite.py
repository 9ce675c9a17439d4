"""``evaluate`` over a benchmark suite: the table re-scores from its JSONL predictions (with an
independent SQuAD scorer written here), sampling rules, skipped rows in the notes, MLflow metrics,
policy cards, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import string
from collections import Counter

import pytest
from training_fixtures import _one_thread, rollout_config, training_env  # noqa: F401  (fixtures)

from stepsearch.errors import StepSearchError
from stepsearch.commands.evaluate import POLICY_CARD, Suite, load_suite, run_suite, sample_examples


def _norm(text: str) -> str:  # SQuAD v1.1, written out again on purpose
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _em(pred, golds) -> float:
    return float(pred is not None and any(_norm(pred) == _norm(g) for g in golds))


def _f1(pred, golds) -> float:
    if pred is None:
        return 0.0
    best = 0.0
    for gold in golds:
        p, g = _norm(pred).split(), _norm(gold).split()
        same = sum((Counter(p) & Counter(g)).values())
        if same:
            precision, recall = same / len(p), same / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.fixture(scope="module")
def suite_run(training_env, tmp_path_factory):
    """One suite run: agent/rag/direct × the warm-started policy × two benchmarks (one with a no-answer row)."""
    import shutil

    root = tmp_path_factory.mktemp("suite")
    policy = root / "policy"
    shutil.copytree(training_env.sft_dir, policy)
    config = rollout_config(max_turns=2)
    from dataclasses import asdict

    (policy / POLICY_CARD).write_text(json.dumps({"rollout": asdict(config)}))
    rows = [json.loads(line) for line in training_env.test.read_text().splitlines()]
    flashrag = root / "flash.jsonl"
    with flashrag.open("w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({"id": f"f{i}", "question": row["question"], "golden_answers": row["answers"]}) + "\n")
        handle.write(json.dumps({"id": "empty", "question": "Who?", "golden_answers": []}) + "\n")
    uri = f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    suite = Suite(benchmarks={"world": str(training_env.val), "flash": str(flashrag)}, models={"sft": str(policy)},
                  methods=["agent", "rag", "direct"], index=str(training_env.index_dir), sample=6, seed=630,
                  batch_size=4, output_dir=str(root / "out"), experiment="eval-test")
    import contextlib
    import io

    printed = io.StringIO()  # not a terminal: evaluate's progress comes as plain lines
    with contextlib.redirect_stdout(printed):
        table_rows, md = run_suite(suite)
    mp.undo()
    (root / "stdout.txt").write_text(printed.getvalue())
    return root, suite, table_rows, md, uri


def test_predictions_rescore_to_the_table(suite_run):
    root, suite, table_rows, md, _ = suite_run
    assert [(r["method"], r["model"]) for r in table_rows] == [("agent", "sft"), ("rag", "sft"), ("direct", "sft")]
    for row in table_rows:
        preds = [json.loads(line) for line in (root / "out" / "predictions" / f"{row['method']}-sft.jsonl").open()]
        for bench in ("world", "flash"):
            mine = [p for p in preds if p["benchmark"] == bench]
            assert len(mine) == 6 == row["scores"][bench]["n"]
            assert row["scores"][bench]["em"] == pytest.approx(sum(_em(p["prediction"], p["answers"]) for p in mine) / 6)
            assert row["scores"][bench]["f1"] == pytest.approx(sum(_f1(p["prediction"], p["answers"]) for p in mine) / 6)
        assert row["avg_em"] == pytest.approx((row["scores"]["world"]["em"] + row["scores"]["flash"]["em"]) / 2)
        if row["method"] == "rag":  # FlashRAG's standard RAG: the question's top 5, once
            assert all(len(p["searches"]) == 1 and len(p["searches"][0]["ids"]) == 5 for p in preds)
            assert all(p["searches"][0]["query"] == p["question"] for p in preds)
        if row["method"] == "direct":
            assert all(p["searches"] == [] for p in preds)
        if row["method"] in ("rag", "direct"):  # the answer is the generation's first line
            assert all(p["prediction"] == p["response"].strip().split("\n")[0].strip() for p in preds)
    csv = (root / "out" / "table.csv").read_text().splitlines()
    assert csv[0].startswith("method,model,world EM,world F1,flash EM") and len(csv) == 4
    assert f"{table_rows[0]['scores']['world']['em']:.3f}" in csv[1]
    assert "flash: 6 questions (6 sampled, seed 630); 1 rows skipped" in md


def test_progress_lines_when_not_a_terminal(suite_run):
    root = suite_run[0]
    lines = (root / "stdout.txt").read_text().splitlines()
    for method in ("agent", "rag", "direct"):
        for bench in ("world", "flash"):
            assert f"{method} sft {bench}: 0/6 questions (0%)" in lines
            assert any(line.startswith(f"{method} sft {bench}: 6/6 questions (100%)") and "done in" in line
                       for line in lines)


def test_table_reaches_mlflow(suite_run):
    import mlflow

    _, _, table_rows, _, uri = suite_run
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("eval-test")
    runs = {r.data.tags["method"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"agent", "rag", "direct"}
    for row in table_rows:
        metrics = runs[row["method"]].data.metrics
        assert metrics["test/world/em"] == pytest.approx(row["scores"]["world"]["em"])
        assert metrics["test/flash/f1"] == pytest.approx(row["scores"]["flash"]["f1"])
    artifacts = {a.path for a in client.list_artifacts(runs["agent"].info.run_id)}
    assert {"benchmark_table.md", "benchmark_table.csv", "predictions"} <= artifacts


def test_sampling_rules():
    items = list(range(100))
    assert sample_examples(items, 5, None) == [0, 1, 2, 3, 4]
    drawn = sample_examples(items, 5, 630)
    assert drawn == sample_examples(items, 5, 630) and drawn == sorted(drawn) and drawn != [0, 1, 2, 3, 4]
    assert sample_examples(items, 520, 630) == items


def test_bad_input_is_one_line(tmp_path, training_env):
    bad = tmp_path / "suite.yaml"
    bad.write_text("benchmarks: [unclosed\n")
    with pytest.raises(StepSearchError, match=r"suite .*suite.yaml: cannot read it as YAML"):
        load_suite(str(bad), {})
    bad.write_text("benchmark: {a: b}\n")
    with pytest.raises(StepSearchError, match="unknown key\\(s\\) benchmark"):
        load_suite(str(bad), {})
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"foo": 1}\n')
    suite = Suite(benchmarks={"g": str(garbage)}, models={"m": str(training_env.sft_dir)}, index=str(training_env.index_dir),
                  output_dir=str(tmp_path / "o"), experiment="")
    with pytest.raises(StepSearchError, match="garbage.jsonl: cannot tell the format"):
        run_suite(suite)
    suite.benchmarks = {"v": str(training_env.val)}
    suite.index = str(tmp_path)
    with pytest.raises(StepSearchError, match="is not an index"):
        run_suite(suite)


def test_ask_prints_the_trajectory_turn_by_turn(training_env, capsys):
    import argparse

    from stepsearch.commands.evaluate import run_ask

    question = [json.loads(line) for line in training_env.val.read_text().splitlines()][0]["question"]
    args = argparse.Namespace(question=question, model=str(training_env.sft_dir), index=str(training_env.index_dir),
                              url=None, method="rag", template=None, max_turns=None, dtype="float32")
    assert run_ask(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("question: ") and lines[1].startswith("  retrieved: ") and "(" in lines[1]
    assert lines[2].startswith("turn 1: ")  # rag: the question's passages (titles with ids), then the answer
    assert any(line.startswith("answer: ") for line in lines) and "1 searches" in out


def test_trajectory_lines_pair_searches_with_their_results():
    from types import SimpleNamespace

    from stepsearch.commands.evaluate import trajectory_lines

    step = SimpleNamespace(passage_titles=["A", "B"], passage_ids=["1", "2"])
    record = SimpleNamespace(
        response_text="<think> x </think> <search> q1 </search>\n\n<information> Doc 1 </information>\n\n"
                      "<think> y </think> <answer> z </answer>",
        steps=[step], invalid_actions=[])
    assert trajectory_lines(record) == ["turn 1: <think> x </think> <search> q1 </search>", "  retrieved: A (1) | B (2)",
                                        "turn 2: <think> y </think> <answer> z </answer>"]


def test_policy_settings_lookup_never_creates_a_store_or_trips_on_a_corrupt_card(tmp_path, monkeypatch):
    """A plain model directory and no MLflow store: nothing is created, the defaults are used; a
    truncated policy card is one error line naming the file."""
    from stepsearch.errors import StepSearchError
    from stepsearch.commands.evaluate import POLICY_CARD, policy_rollout

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent.db")
    model = tmp_path / "model"
    model.mkdir()
    _config, card = policy_rollout(str(model), {})
    assert card == {} and not (tmp_path / "absent.db").exists()
    (model / POLICY_CARD).write_text('{"rollout": {"template": "comp')
    with pytest.raises(StepSearchError, match=f"{POLICY_CARD}: unreadable policy card"):
        policy_rollout(str(model), {})
