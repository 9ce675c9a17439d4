"""Records that survive a bad day, driven as the issue did (``python -m stepsearch fit`` on a tiny
quickstart): a second ``fit`` into a running run's directory, a run stopped by SIGTERM whose folder
is then moved and resumed, a truncated checkpoint, and a checkpoint that passes the check but does
not load. What the run directory and the MLflow store hold is read back after each.

One run (``runs/quickstart-steppo-seed0``, 8 PPO iterations, a checkpoint every 2) is made by the
module fixture and carried through the tests in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from cli_runs import kill_started_processes  # noqa: F401  (autouse fixture: no child outlives a test)
from cli_runs import error_lines, fit_args, mlflow_client, run_cli, run_in_process, start_cli, wait_for

pytestmark = pytest.mark.slow

STEPS = 8
SCHEDULE = ("--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2",
            "--trainer.callbacks.save_top_k", "-1")
RUN = "quickstart-steppo-seed0"


def _runs(root):
    client = mlflow_client(root)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def stopped(root):
    """Fit A is started; while it holds the run's lock (paused, so that the tiny run cannot end
    first), fit B is started into the same directory; A then goes on and is stopped by SIGTERM
    after its first checkpoint. Returns (A's pid, A's exit code, B's result)."""
    run_dir = root / "runs" / RUN
    first = start_cli(fit_args(root, *SCHEDULE), cwd=root, log=root / "A.log")
    # A is in its fit: it holds the lock (or, without one, has written its record).
    wait_for(lambda: (run_dir / "run.lock").exists() or (run_dir / "run.json").exists(), first)
    first.send_signal(signal.SIGSTOP)  # A holds the lock, alive, for as long as B takes
    try:
        second = run_cli(fit_args(root, *SCHEDULE), cwd=root)
    finally:
        first.send_signal(signal.SIGCONT)
    wait_for(lambda: (run_dir / "checkpoints" / "iter-000002.ckpt").exists(), first)
    first.send_signal(signal.SIGTERM)
    return first.pid, first.wait(timeout=600), second


def test_a_second_fit_into_a_running_runs_directory_fails_in_one_line(root, stopped):
    pid, code, second = stopped
    assert code == 128 + signal.SIGTERM, (root / "A.log").read_text()[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = error_lines(second.stderr)
    assert "in use by another fit" in line and f"pid {pid} on " in line
    run_dir = root / "runs" / RUN
    assert not (run_dir / "run.lock").exists()  # released by the owner as it ended
    client, runs = _runs(root)
    assert len(runs) == 1 and runs[0].data.tags["stop_reason"] == "SIGTERM"  # B made no MLflow run
    assert json.loads((run_dir / "run.json").read_text())["mlflow"]["run_id"] == runs[0].info.run_id
    assert not list((run_dir / "checkpoints").glob("*-v*.ckpt"))  # B wrote no checkpoint beside A's


def test_a_moved_run_folder_resumes_and_the_finished_run_drops_its_stop_reason(root, stopped):
    """Moving ``runs/`` and pointing ``--trainer.default_root_dir`` at the new place is not a config
    change; the resumed run, once finished, no longer says it was stopped by SIGTERM."""
    shutil.move(root / "runs", root / "moved")
    proc = run_cli(fit_args(root, *SCHEDULE, "--ckpt_path", "last", trainer__default_root_dir=root / "moved"), cwd=root)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    client, runs = _runs(root)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    assert not {"stop_reason", "resume_checkpoint", "error"} & set(run.data.tags), run.data.tags
    assert run.data.tags["run_dir"] == str((root / "moved" / RUN).resolve())
    record = json.loads((root / "moved" / RUN / "run.json").read_text())
    (resume,) = record["resumes"]
    assert resume["config_changes"] == [] and resume["previous_end"]["stop_reason"] == "SIGTERM"
    names = sorted(p.name for p in (root / "moved" / RUN / "checkpoints").glob("iter-*.ckpt"))
    assert names[-1] == f"iter-{STEPS:06d}.ckpt" and "iter-000004.ckpt" in names  # all kept


def _snapshot(root, run_dir):
    client, (run,) = _runs(root)
    return run.info.status, run.data.tags, (run_dir / "run.json").read_bytes()


def test_a_truncated_checkpoint_is_one_line_and_changes_nothing(root, stopped, capsys, monkeypatch):
    """The issue: ``--ckpt_path last`` on a truncated checkpoint turned the FINISHED run FAILED,
    overwrote ``resumed_from`` and recorded a resume in ``run.json`` that never loaded."""
    run_dir = root / "moved" / RUN
    last = run_dir / "checkpoints" / f"iter-{STEPS:06d}.ckpt"
    before = _snapshot(root, run_dir)
    assert before[0] == "FINISHED"
    size = last.stat().st_size // 2
    os.truncate(last, size)
    monkeypatch.chdir(root)
    code, text = run_in_process(fit_args(root, *SCHEDULE, "--ckpt_path", "last", trainer__default_root_dir=root / "moved"),
                                capsys, monkeypatch)
    assert code == 2, text[-3000:]
    (line,) = error_lines(text)
    assert str(last) in line and f"{size:,} bytes" in line and "truncated or not a checkpoint" in line
    assert f"previous valid checkpoint is iter-{STEPS - 2:06d}.ckpt" in line
    assert _snapshot(root, run_dir) == before
    assert not (run_dir / "run.lock").exists()


def test_a_checkpoint_that_does_not_load_changes_nothing(root, stopped):
    """A whole file that is not this run's checkpoint passes the check, and Lightning fails to load
    it: the recorded run keeps its status and tags, ``run.json`` its resumes."""
    run_dir = root / "moved" / RUN
    last = run_dir / "checkpoints" / f"iter-{STEPS:06d}.ckpt"
    torch.save({"something": "else"}, last)
    before = _snapshot(root, run_dir)
    proc = run_cli(fit_args(root, *SCHEDULE, "--ckpt_path", "last", trainer__default_root_dir=root / "moved"), cwd=root)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert _snapshot(root, run_dir) == before
    assert not (run_dir / "run.lock").exists()
