"""``compare`` on a small MLflow store made here (two groups × two runs): grouped final/best means and
sample standard deviations against hand values, the Markdown/CSV/PNG, selection, and one-line errors."""

from __future__ import annotations

import statistics

import pytest

from stepsearch.commands.compare import compare, mean_std, runs_urls
from stepsearch.errors import StepSearchError

# algorithm -> seed -> val/em by step (0, 8, 16), and the last train reward
CURVES = {
    "steppo": {0: [0.10, 0.30, 0.25], 1: [0.12, 0.20, 0.40]},
    "ppo": {0: [0.10, 0.15, 0.20], 1: [0.11, 0.18, 0.16]},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("cmp", artifact_location=str(root / "artifacts"))
    other = client.create_experiment("other", artifact_location=str(root / "artifacts2"))
    ids = {}
    for algorithm, seeds in CURVES.items():
        for seed, ems in seeds.items():
            run = client.create_run(experiment, run_name=f"{algorithm}-seed{seed}",
                                    tags={"algorithm": algorithm, "seed": str(seed)})
            run_id = run.info.run_id
            client.log_param(run_id, "model.ppo.algorithm", algorithm)
            for step, em in zip((0, 8, 16), ems):
                client.log_metric(run_id, "val/em", em, step=step)
                client.log_metric(run_id, "val/hops_2/em", em + 0.1, step=step)
                client.log_metric(run_id, "val/searches", 1.0 + seed, step=step)
            for step in range(17):
                client.log_metric(run_id, "train/reward", -0.5 + step * 0.01 * (seed + 1), step=step)
            client.set_terminated(run_id)
            ids[(algorithm, seed)] = run_id
    client.create_run(other, tags={"algorithm": "steppo"})  # another experiment: not selected
    return root, uri, ids


def test_grouped_means_and_stds(store, tmp_path):
    _, uri, _ = store
    rows, groups, md = compare(uri, ["cmp"], group_by="tag.algorithm", out_dir=tmp_path)
    assert {k: len(v) for k, v in groups.items()} == {"ppo": 2, "steppo": 2}
    by_metric = {row["metric"]: row for row in rows}
    assert list(by_metric)[:3] == ["val/em", "val/searches", "val/hops_2/em"]
    for algorithm, seeds in CURVES.items():
        finals = [ems[-1] for ems in seeds.values()]
        bests = [max(ems) for ems in seeds.values()]
        mean, std, n = by_metric["val/em"]["final"][algorithm]
        assert (mean, std, n) == (pytest.approx(statistics.mean(finals)), pytest.approx(statistics.stdev(finals)), 2)
        mean, std, _ = by_metric["val/em"]["best"][algorithm]
        assert mean == pytest.approx(statistics.mean(bests)) and std == pytest.approx(statistics.stdev(bests))
        assert by_metric["val/hops_2/em"]["final"][algorithm][0] == pytest.approx(statistics.mean(finals) + 0.1)
        assert by_metric["val/searches"]["final"][algorithm][0] == pytest.approx(1.5)  # seeds 0, 1: 1 and 2 searches
        assert by_metric["val/searches"]["best"][algorithm] is None  # "best" is for scores only
        rewards = [-0.5 + 16 * 0.01 * (seed + 1) for seed in seeds]
        assert by_metric["train/reward"]["final"][algorithm][0] == pytest.approx(statistics.mean(rewards))
    steppo_final = statistics.mean([0.25, 0.40])
    assert f"| val/em | {0.18:.3f} ± {statistics.stdev([0.20, 0.16]):.3f} | {steppo_final:.3f} ±" in md
    assert "ppo (n=2), steppo (n=2)" in md
    csv = (tmp_path / "compare.csv").read_text().splitlines()
    assert csv[0] == "metric,group,n,final_mean,final_std,best_mean,best_std" and csv[2].startswith("val/em,steppo,2,0.325000")
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_by_run_ids_filter_and_param(store, tmp_path):
    _, uri, ids = store
    rows, groups, _ = compare(uri, run_ids=[ids[("steppo", 0)], ids[("ppo", 1)]], group_by="model.ppo.algorithm",
                              out_dir=tmp_path)
    assert {k: len(v) for k, v in groups.items()} == {"ppo": 1, "steppo": 1}
    assert rows[0]["final"]["ppo"] == (pytest.approx(0.16), 0.0, 1)
    _, groups, _ = compare(uri, ["cmp"], filter_string="tags.seed = '1'", group_by="tag.algorithm", out_dir=tmp_path)
    assert sorted(r.data.tags["seed"] for g in groups.values() for r in g) == ["1", "1"]


def test_bad_input_is_one_line(store, tmp_path):
    _, uri, _ = store
    with pytest.raises(StepSearchError, match="run 0123abcd does not exist"):
        compare(uri, run_ids=["0123abcd"], out_dir=tmp_path)
    with pytest.raises(StepSearchError, match="no selected run has 'model.ppo.nothing'.*model.ppo.algorithm"):
        compare(uri, ["cmp"], group_by="model.ppo.nothing", out_dir=tmp_path)
    with pytest.raises(StepSearchError, match="no MLflow experiment named 'nope'.*cmp"):
        compare(uri, ["nope"], out_dir=tmp_path)


def test_mean_std_and_ui_urls(store):
    assert mean_std([1.0]) == (1.0, 0.0, 1)
    assert mean_std([1.0, 2.0, 4.0])[1] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    _, uri, _ = store
    urls = dict(runs_urls(uri, "127.0.0.1", 5000))
    assert urls["cmp"].startswith("http://127.0.0.1:5000/#/experiments/")
    assert urls["cmp"].endswith("/runs?workflowType=machine_learning")


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory):
    """The issue's case: a finished 50-iteration, 200-question run and a 3-iteration, 32-question
    run of one algorithm, one finished run of another, and a RUNNING run whose last validation (at
    iteration 8) would otherwise count as final."""
    import mlflow

    root = tmp_path_factory.mktemp("uneven")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("uneven", artifact_location=str(root / "artifacts"))

    def run(name, algorithm, ems, steps, val_questions, finished=True):
        run_id = client.create_run(experiment, run_name=name, tags={"algorithm": algorithm}).info.run_id
        client.log_param(run_id, "data.max_val_examples", str(val_questions))
        client.log_param(run_id, "data.world.val_size", "200")
        for step, em in zip(steps, ems):
            client.log_metric(run_id, "val/em", em, step=step)
        if finished:
            client.set_terminated(run_id)
        return run_id

    ids = {"long": run("steppo-long", "steppo", [0.05, 0.19], (0, 50), 200),
           "short": run("steppo-short", "steppo", [0.02, 0.03], (0, 3), 32),
           "ppo": run("ppo-seed0", "ppo", [0.05, 0.190], (0, 50), 200),
           "running": run("ppo-running", "ppo", [0.05, 0.60], (0, 8), 200, finished=False)}
    return uri, ids


def test_one_run_is_a_bare_value_and_running_runs_are_left_out(uneven_store, tmp_path):
    uri, ids = uneven_store
    notes: list[str] = []
    rows, groups, md = compare(uri, ["uneven"], out_dir=tmp_path, notes=notes)
    assert sorted(r.info.run_id for r in groups["ppo"]) == [ids["ppo"]]  # not the RUNNING one
    assert rows[0]["final"]["ppo"] == (pytest.approx(0.19), 0.0, 1)
    assert "| val/em | 0.190 | 0.110 ± 0.113 |" in md  # n = 1: no "± 0.000"
    assert "0.190 ±" not in md
    csv = (tmp_path / "compare.csv").read_text().splitlines()
    assert "val/em,ppo,1,0.190000,,0.190000," in csv  # no spread from one run
    assert any(n.startswith("left out 1 run(s) still RUNNING") and "ppo-running" in n for n in notes), notes
    assert "**Warning:** left out 1 run(s) still RUNNING" in md
    notes = []
    rows, groups, _ = compare(uri, ["uneven"], out_dir=tmp_path, include_running=True, notes=notes)
    assert len(groups["ppo"]) == 2 and rows[0]["final"]["ppo"][0] == pytest.approx((0.19 + 0.60) / 2)
    assert any("still RUNNING are counted" in n and "ppo-running" in n for n in notes), notes
    with pytest.raises(StepSearchError, match="every selected run is still RUNNING.*--include-running"):
        compare(uri, run_ids=[ids["running"]], out_dir=tmp_path)


def test_runs_of_different_budgets_are_named(uneven_store, tmp_path):
    uri, _ = uneven_store
    notes: list[str] = []
    compare(uri, ["uneven"], out_dir=tmp_path, notes=notes)
    assert ("the runs differ in PPO iterations (3: steppo-short; 50: ppo-seed0, steppo-long): "
            "their final values do not compare") in notes
    assert ("the runs differ in validation set (200 questions: ppo-seed0, steppo-long; 32 questions: steppo-short): "
            "their final values do not compare") in notes
    notes = []
    compare(uri, ["uneven"], filter_string="tags.algorithm = 'ppo'", out_dir=tmp_path, notes=notes)
    assert not [n for n in notes if "differ" in n]  # the same budget: no warning


def test_compare_and_ui_name_their_store_and_warn_when_new_or_empty(uneven_store, tmp_path, monkeypatch, capsys):
    from stepsearch.cli import main

    uri, _ = uneven_store
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["compare", "--experiment", "uneven", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert done.value.code == 2
    assert out.err.strip() == (f"error: no MLflow store at {tmp_path / 'mlflow.db'} (sqlite:///mlflow.db): run from the "
                               "directory you trained in, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the "
                               "store the runs went to")
    assert not (tmp_path / "mlflow.db").exists()  # no empty store left behind
    with pytest.raises(SystemExit) as done:
        main(["ui", "--print-only"])
    out = capsys.readouterr()
    assert done.value.code == 0
    assert out.out.splitlines()[0] == f"MLflow store: sqlite:///mlflow.db ({tmp_path / 'mlflow.db'})"
    assert f"warning: {tmp_path / 'mlflow.db'} does not exist: a new, empty store is created there" in out.err
    with pytest.raises(SystemExit):
        main(["ui", "--print-only"])  # now it exists, and is empty
    assert "warning: the store sqlite:///mlflow.db holds no runs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["compare", "--experiment", "uneven", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err
    assert out.out.splitlines()[0] == f"MLflow store: {uri}"
    assert "warning: left out 1 run(s) still RUNNING" in out.err and "warning: the runs differ in PPO iterations" in out.err
