"""One writer per run directory (``stepsearch.records.lock``): the lock names a live owner, a dead
owner's lock on this host is taken over, another host's is never broken, and under DDP only launch
rank 0 takes it. (The two-``fit`` reproduction is in ``test_records_fit.py``.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.records.lock import LOCK_FILE, RunLock, _process_start, launch_rank


def _write_lock(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(owner))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_taker_fails_in_one_line_naming_the_owner(tmp_path, sleeper):
    first = RunLock(tmp_path / "run").acquire()
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    # Another live process on this host holds it: refused, naming that process.
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    _write_lock(tmp_path / "run", pid=sleeper.pid, host=socket.gethostname(), process_start=_process_start(sleeper.pid),
                started="2026-01-01T00:00:00+00:00")
    with pytest.raises(StepSearchError) as err:
        RunLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert "\n" not in message and f"pid {sleeper.pid} on {socket.gethostname()}" in message
    assert "in use by another fit" in message
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == sleeper.pid  # left alone


def test_a_dead_owners_lock_on_this_host_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path / "run", pid=gone.pid, host=socket.gethostname(), started="then")
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.took_over["pid"] == gone.pid
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary files left


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path, sleeper):
    """The PID lives, but the process started at another time than the owner did: stale."""
    _write_lock(tmp_path / "run", pid=sleeper.pid, host=socket.gethostname(), process_start="1")
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.took_over["pid"] == sleeper.pid


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    _write_lock(tmp_path / "run", pid=1, host="elsewhere.example", started="then")
    with pytest.raises(StepSearchError) as err:
        RunLock(tmp_path / "run").acquire()
    assert "pid 1 on elsewhere.example" in str(err.value) and f"delete {tmp_path / 'run' / LOCK_FILE}" in str(err.value)


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, sleeper):
    lock = RunLock(tmp_path / "run").acquire()
    _write_lock(tmp_path / "run", pid=sleeper.pid, host=socket.gethostname())  # someone else's now
    lock.release()
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == sleeper.pid


@pytest.mark.parametrize("env, devices, rank", [({}, 2, 0), ({"LOCAL_RANK": "1"}, 2, 1),
                                                ({"LOCAL_RANK": "1", "NODE_RANK": "1"}, 2, 3)])
def test_launch_rank_under_ddp(monkeypatch, env, devices, rank):
    """Lightning's launcher re-runs the command for ranks 1..N-1 with LOCAL_RANK/NODE_RANK set; they
    must not fight rank 0 for the lock (``global_rank`` is only set once fit has launched them)."""
    from lightning.pytorch import Trainer

    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp", num_nodes=2 if "NODE_RANK" in env else 1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert launch_rank(trainer) == rank
    assert launch_rank(Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)) == 0


def test_only_launch_rank_zero_takes_the_lock(tmp_path, monkeypatch, sleeper):
    """``open_run`` on rank 1 while rank 0 (here: a live process) holds the run's lock: no error, no lock taken."""
    from lightning.pytorch import Trainer

    from stepsearch.records.session import open_run

    _write_lock(tmp_path / "run", pid=sleeper.pid, host=socket.gethostname(), process_start=_process_start(sleeper.pid))
    monkeypatch.setenv("LOCAL_RANK", "1")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    run_dir, resume, lock = open_run({"run_dir": str(tmp_path / "run")}, {"ckpt_path": None}, trainer, 0, {})
    assert (run_dir, resume, lock) == (tmp_path / "run", None, None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    with pytest.raises(StepSearchError, match=f"pid {sleeper.pid}"):
        open_run({"run_dir": str(tmp_path / "run")}, {"ckpt_path": None}, trainer, 0, {})
