"""The tool subcommands as a user runs them (subprocesses): help, and bad input reported as one
``error:`` line naming what is wrong, without a traceback."""

from __future__ import annotations

import subprocess

from training_fixtures import PYTHON, python_env


def _run(args, cwd, **env_overrides):
    env = python_env()
    env.update(env_overrides)
    return subprocess.run([PYTHON, "-m", "stepsearch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


def _error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def test_fit_help_offers_no_optimizer_flags(tmp_path):
    fit = _run(["fit", "--help"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "--model.optim OPTIM" in fit.stdout
    assert "--optimizer" not in fit.stdout and "--lr_scheduler" not in fit.stdout
    bad = _run(["fit", "--optimizer", "AdamW"], tmp_path)
    assert bad.returncode != 0 and "empty parameter list" not in bad.stderr


def test_tool_help_lists_the_new_commands(tmp_path):
    top = _run(["--help"], tmp_path)
    for command in ("evaluate", "ask", "compare", "ui"):
        assert command in top.stdout, command
    evaluate = _run(["evaluate", "--help"], tmp_path)
    assert "--sample" in evaluate.stdout and "{agent,rag,direct}" in evaluate.stdout


def test_bad_input_is_one_error_line(tmp_path):
    garbage = tmp_path / "bench.jsonl"
    garbage.write_text("not json at all\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cases = [
        (["evaluate", "--benchmark", str(garbage), "--model", str(tmp_path), "--index", str(tmp_path),
          "--experiment", ""], "bench.jsonl"),
        (["evaluate", "--benchmark", str(tmp_path / "missing.jsonl"), "--model", "m", "--index", str(tmp_path)],
         "missing.jsonl does not exist"),
        (["compare", "--run-id", "feedbeef"], f"no MLflow store at {tmp_path / 'mlflow.db'}"),  # none made yet
        (["ui", "--print-only", "--port", "5055"], None),  # makes the (empty) store
        (["compare", "--run-id", "feedbeef"], "run feedbeef does not exist"),
        (["compare", "--experiment", "nothing-here"], "no MLflow experiment named 'nothing-here'"),
    ]
    for args, expected in cases:
        proc = _run(args, tmp_path, MLFLOW_TRACKING_URI=uri)
        if expected is None:
            assert proc.returncode == 0, proc.stderr[-1500:]
            continue
        lines = _error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, proc.stdout, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr


def test_ui_prints_the_runs_table_url(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = mlflow.MlflowClient(uri).create_experiment("quickstart", artifact_location=str(tmp_path / "a"))
    proc = _run(["ui", "--print-only", "--port", "5055"], tmp_path, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert f"quickstart: http://127.0.0.1:5055/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in proc.stdout
