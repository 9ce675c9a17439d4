"""Checks before any work, driven through ``python -m stepsearch`` in-process (``stepsearch.records.store``,
``commands.fit.prepare_fit``): an unreachable or unwritable tracking store, an unwritable output
path, a binary suite file, and a configuration refused at setup are each one error line, in
seconds, with nothing left behind (no run directory, no MLflow run).

Unwritable paths are made by putting them under a regular *file* (``a_file/sub``): the tests run as
root, for whom ``chmod`` does not stop writes, but no one can create a folder inside a file.
"""

from __future__ import annotations

import time

import pytest
from cli_runs import error_lines, fit_args, run_in_process

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def _one_line(code, text, *parts):
    assert code == 2, text[-3000:]
    lines = error_lines(text)
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_fit_with_an_unreachable_store_fails_in_seconds(tmp_path, capsys, monkeypatch):
    """The issue: ``MLFLOW_TRACKING_URI=http://127.0.0.1:9 fit`` took 4 min 17 s and 5 tracebacks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    started = time.monotonic()
    code, text = run_in_process(fit_args(tmp_path, **{"trainer__logger__init_args__tracking_uri": "null"}),
                                capsys, monkeypatch)
    elapsed = time.monotonic() - started
    _one_line(code, text, UNREACHABLE, "unreachable", "connection refused")
    assert elapsed < 30, elapsed
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["compare", "--experiment", "quickstart"], ["ui", "--print-only"]])
def test_compare_and_ui_with_an_unreachable_store_fail_in_seconds(tmp_path, capsys, monkeypatch, command):
    """The issue: ``compare`` printed nothing for 100 s (then killed)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    started = time.monotonic()
    code, text = run_in_process(command, capsys, monkeypatch)
    _one_line(code, text, UNREACHABLE, "unreachable")
    assert time.monotonic() - started < 20


def test_evaluate_with_an_unreachable_store_fails_before_evaluating(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE)
    (tmp_path / "policy").mkdir()
    (tmp_path / "bench.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    code, text = run_in_process(["evaluate", "--benchmark", "bench.jsonl", "--model", "policy"], capsys, monkeypatch)
    _one_line(code, text, UNREACHABLE, "unreachable")


def test_fit_with_an_unwritable_sqlite_store_is_one_line(tmp_path, a_file, capsys, monkeypatch):
    """The issue: a sqlite store on a read-only path took 1 min 57 s of retries and 3 tracebacks."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{a_file}/mlflow.db"
    started = time.monotonic()
    code, text = run_in_process(fit_args(tmp_path, **{"trainer__logger__init_args__tracking_uri": uri}), capsys, monkeypatch)
    _one_line(code, text, uri, "cannot create", "is a file, not a folder")
    assert time.monotonic() - started < 30
    garbage = tmp_path / "garbage.db"
    garbage.write_text("this is not a database " * 100)
    uri = f"sqlite:///{garbage}"
    code, text = run_in_process(fit_args(tmp_path, **{"trainer__logger__init_args__tracking_uri": uri}), capsys, monkeypatch)
    _one_line(code, text, uri, "not an MLflow store")


def test_unwritable_output_paths_are_one_line(tmp_path, a_file, capsys, monkeypatch):
    """``fit`` with an unwritable ``default_root_dir`` was two chained ``OSError`` tracebacks."""
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(fit_args(tmp_path, **{"trainer__default_root_dir": a_file / "runs"}), capsys, monkeypatch)
    _one_line(code, text, "run directory", str(a_file / "runs"), "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mlflow.db"]  # no run directory anywhere

    code, text = run_in_process(["predict", *fit_args(tmp_path, "--predictions_file", a_file / "p.jsonl")[1:]],
                                capsys, monkeypatch)
    _one_line(code, text, "--predictions_file", "is a file, not a folder")

    (tmp_path / "policy").mkdir()
    (tmp_path / "bench.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    code, text = run_in_process(["evaluate", "--benchmark", "bench.jsonl", "--model", "policy", "--experiment", "",
                                 "--output-dir", a_file / "eval"], capsys, monkeypatch)
    _one_line(code, text, "evaluate --output-dir", "is a file, not a folder")

    code, text = run_in_process(["compare", "--experiment", "quickstart", "--out", a_file / "cmp",
                                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], capsys, monkeypatch)
    _one_line(code, text, "compare --out", "is a file, not a folder")


def test_a_binary_suite_file_is_one_line(tmp_path, capsys, monkeypatch):
    """``evaluate --suite`` given a binary file raised ``UnicodeDecodeError``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.yaml").write_bytes(bytes(range(128, 256)) * 4)
    code, text = run_in_process(["evaluate", "--suite", "suite.yaml"], capsys, monkeypatch)
    _one_line(code, text, "suite.yaml", "not a text file")


def test_a_refused_configuration_leaves_no_mlflow_run_and_no_run_directory(tmp_path, capsys, monkeypatch):
    """The issue: ``--model.model.dtype bfloat16 --model.optim.actor_lr 5e-7``, refused at setup,
    left a FAILED MLflow run with 186 params."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(fit_args(tmp_path, "--model.model.dtype", "bfloat16", "--model.optim.actor_lr", "5e-7"),
                                capsys, monkeypatch)
    _one_line(code, text, "model.model.dtype=bfloat16", "5e-07")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "seed0").exists()  # nor the bootstrap's world and models
    if (tmp_path / "mlflow.db").exists():  # the logger may have opened the store; it must hold no run
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
