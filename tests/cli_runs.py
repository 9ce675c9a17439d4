"""Helpers for tests that run ``python -m stepsearch fit`` as a user would: a tiny version of the
quickstart config (small world, tiny model made and warm-started by the bootstrap, short rollouts),
with every path under one directory and ``{seed}`` in the per-seed ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

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


# Every child starts in its own session (process group): a failing test, a timeout or an interrupted
# run kills the whole group, DDP ranks included, instead of leaving training processes behind.
_STARTED: list[subprocess.Popen] = []


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (the group outlives its leader while DDP ranks live on)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has ended already
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def started(proc: subprocess.Popen) -> subprocess.Popen:
    """Register a child started with ``start_new_session=True`` for :func:`kill_started_processes`."""
    _STARTED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def kill_started_processes():
    """Import into a test module: after each test, kill the process groups its children started."""
    yield
    while _STARTED:
        kill_group(_STARTED.pop())


def run_cli(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    args = [PYTHON, "-m", "stepsearch", *args]
    proc = started(subprocess.Popen(args, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:  # timeout or Ctrl-C: nothing of the run may survive
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and the ignore is
    # inherited: Python would then never raise KeyboardInterrupt. The Ctrl-C tests need the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args, cwd, log: Path) -> subprocess.Popen:
    """Start ``python -m stepsearch ARGS`` (output to ``log``) in its own process group (``os.killpg``
    reaches the DDP ranks it launches), with SIGINT at its default; the group is killed when the
    test ends."""
    with open(log, "w") as handle:
        return started(subprocess.Popen([PYTHON, "-m", "stepsearch", *args], cwd=cwd, env=cli_env(), stdout=handle,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                        preexec_fn=_default_sigint))


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
    kill_group(proc)
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

