"""Helpers for tests that run ``python -m stepsearch fit`` as a user would: a tiny version of the
quickstart config (small world, tiny model made and warm-started by the bootstrap, short rollouts),
with every path under one directory and ``{seed}`` in the per-seed ones."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from training_fixtures import PYTHON, REPO, python_env

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def tiny_overrides(root: Path) -> dict:
    """The quickstart config shrunk to seconds per PPO iteration on one core, under ``root``."""
    world = f"{root}/seed{{seed}}/world"
    return {
        "data.world_dir": world, "data.world.num_people": 30, "data.world.num_places": 10,
        "data.world.num_regions": 4, "data.world.num_countries": 2, "data.world.num_orgs": 8,
        "data.world.num_works": 16, "data.world.train_size": 24, "data.world.val_size": 4, "data.world.test_size": 4,
        "data.batch_size": 4, "data.val_batch_size": 4, "data.max_val_examples": 4,
        "model.model.name_or_path": f"{root}/seed{{seed}}/sft",
        "model.bootstrap.tiny.out_dir": f"{root}/seed{{seed}}/tiny",
        "model.bootstrap.tiny.corpus_files": json.dumps([f"{world}/corpus.jsonl", f"{world}/train.jsonl"]),
        "model.bootstrap.tiny.vocab_size": 512, "model.bootstrap.tiny.hidden_size": 32,
        "model.bootstrap.tiny.num_layers": 1, "model.bootstrap.tiny.num_heads": 2,
        "model.bootstrap.tiny.num_kv_heads": 1, "model.bootstrap.tiny.intermediate_size": 64,
        "model.bootstrap.warm_start.data": json.dumps([f"{world}/train.jsonl"]),
        "model.bootstrap.warm_start.max_examples": 8, "model.bootstrap.warm_start.epochs": 1,
        "model.rollout.max_turns": 2, "model.rollout.max_response_tokens": 24,
        "model.rollout.max_context_tokens": 400,
        "model.ppo.mini_batch_size": 2, "model.ppo.micro_batch_size": 2, "model.log_samples_every_n_steps": 0,
        "trainer.default_root_dir": root / "runs",
        "trainer.logger.init_args.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "trainer.enable_progress_bar": "false", "trainer.enable_model_summary": "false",
    }


def fit_args(root: Path, *extra: str, **overrides) -> list[str]:
    settings = {**tiny_overrides(root), **{k.replace("__", "."): v for k, v in overrides.items()}}
    args = ["fit", "--config", str(QUICKSTART)]
    for key, value in settings.items():
        args += [f"--{key}", str(value)]
    return args + list(extra)


def cli_env() -> dict:
    env = python_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cli(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "stepsearch", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args, cwd, log: Path, new_session: bool = False) -> subprocess.Popen:
    """Start ``python -m stepsearch ARGS`` (output to ``log``); ``new_session``: its own process
    group, so DDP ranks it launches can be killed with it (``os.killpg``)."""
    handle = open(log, "w")
    return subprocess.Popen([PYTHON, "-m", "stepsearch", *args], cwd=cwd, env=cli_env(), stdout=handle,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.05):
    """Poll until ``predicate()`` is truthy (returns it); fail if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held")
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out waiting")


def run_in_process(args, capsys, monkeypatch) -> tuple[int, str]:
    """``python -m stepsearch ARGS`` in the test's process, for input refused before any training
    (no subprocess start-up); returns the exit code and stdout+stderr."""
    import logging
    import sys

    import pytest

    from stepsearch.cli import main

    monkeypatch.setattr(sys, "argv", ["stepsearch"])  # LightningCLI warns about args besides pytest's argv
    # Lightning's log handler may still hold an earlier test's captured stream (closed since).
    monkeypatch.setattr(logging, "raiseExceptions", False)
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def mlflow_client(root: Path):
    import mlflow

    return mlflow.tracking.MlflowClient(f"sqlite:///{root}/mlflow.db")

