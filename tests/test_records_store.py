"""The tracking store check and MLflow's HTTP retries (``stepsearch.records.store``), below the CLI
(the command-line reproductions are in ``test_records_cli.py``)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.records.store import HTTP_DEFAULTS, bound_http_retries, check_store


@pytest.fixture
def no_http_settings(monkeypatch):
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)


def test_a_store_that_dies_mid_run_costs_seconds_per_call_not_minutes(no_http_settings, monkeypatch):
    """MLflow's defaults (7 retries, backoff factor 2, 120 s per request) spend minutes on every call
    to a dead server; bounded, a call fails in seconds. An explicit setting is kept."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    bound_http_retries()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    started = time.monotonic()
    with pytest.raises(MlflowException):
        mlflow.MlflowClient("http://127.0.0.1:9").search_experiments()
    assert time.monotonic() - started < 20


def test_a_sqlite_store_being_written_by_another_fit_is_not_refused(tmp_path):
    """Three seeds training into one ``mlflow.db``: one holds the write lock for a moment."""
    database = tmp_path / "mlflow.db"
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held through the check
    try:
        check_store(f"sqlite:///{database}", timeout=0.2)
    finally:
        holder.rollback()
        holder.close()


def test_a_file_that_is_not_a_database_is_named(tmp_path):
    (tmp_path / "notes.db").write_text("plain text, not sqlite " * 50)
    with pytest.raises(StepSearchError, match="is not an MLflow store"):
        check_store(f"sqlite:///{tmp_path / 'notes.db'}", write=False)


def _check_then_create_experiment(uri: str, name: str) -> str:
    import mlflow

    check_store(uri, initialise=True)  # what fit's check does before its logger exists
    mlflow.MlflowClient(uri).create_experiment(name)
    return name


def test_fits_starting_together_on_a_new_sqlite_store_all_get_it(tmp_path):
    """Seeds launched side by side on a fresh ``mlflow.db``: without the store check's lock, MLflow's
    schema migration races and all but one process die ("Online migration expected to match one row",
    seen with two quickstart seeds). With it, each process finds the tables made once."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        made = pool.starmap(_check_then_create_experiment, [(uri, f"seed{i}") for i in range(4)])
    assert made == [f"seed{i}" for i in range(4)]
    import mlflow

    assert {e.name for e in mlflow.MlflowClient(uri).search_experiments()} >= set(made)
