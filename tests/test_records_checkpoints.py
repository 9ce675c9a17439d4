"""Checkpoints a run can trust (``stepsearch.records.checkpoints``): a truncated or foreign file is
found before a resume records anything, and named with the valid one before it; a kill during a
save leaves no half file named like a checkpoint; every checkpoint is kept unless a configured
``ModelCheckpoint`` says otherwise. (The CLI reproductions are in ``test_records_fit.py``.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from stepsearch.errors import StepSearchError
from stepsearch.records.checkpoints import checkpoint_problem, configure_checkpointing, select_resume


def _save(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(2000.0)}}, path)
    return path


def test_a_whole_checkpoint_passes_and_damaged_ones_do_not(tmp_path):
    good = _save(tmp_path / "iter-000002.ckpt", 2)
    assert checkpoint_problem(good) is None
    half = tmp_path / "half.ckpt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert checkpoint_problem(half) is not None
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(4096))
    assert checkpoint_problem(noise) is not None
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:  # a zip, but not what torch.save writes
        archive.writestr("readme.txt", "hello")
    assert "data.pkl" in checkpoint_problem(tmp_path / "other.zip")
    flipped = bytearray(good.read_bytes())  # one byte of the tensor data changed: CRC
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    assert checkpoint_problem(tmp_path / "flipped.ckpt") is not None
    (tmp_path / "dist.ckpt").mkdir()  # an FSDP2 folder whose save did not finish (.metadata comes last)
    (tmp_path / "dist.ckpt" / "__0_0.distcp").write_bytes(b"x" * 100)
    assert ".metadata" in checkpoint_problem(tmp_path / "dist.ckpt")
    (tmp_path / "dist.ckpt" / ".metadata").write_bytes(b"m")
    assert checkpoint_problem(tmp_path / "dist.ckpt") is None


def test_a_truncated_last_checkpoint_is_one_line_offering_the_previous_valid_one(tmp_path):
    """The issue's reproduction at the function ``fit --ckpt_path last`` calls: iter-000004.ckpt
    truncated to half, iter-000002.ckpt whole."""
    folder = tmp_path / "run" / "checkpoints"
    _save(folder / "iter-000002.ckpt", 2)
    last = _save(folder / "iter-000004.ckpt", 4)
    size = last.stat().st_size // 2
    os.truncate(last, size)
    with pytest.raises(StepSearchError) as err:
        select_resume(tmp_path / "run", None, "last", {}, False)
    line = str(err.value)
    assert "\n" not in line
    assert str(last) in line and f"({size:,} bytes)" in line and "truncated or not a checkpoint" in line
    assert "the previous valid checkpoint is iter-000002.ckpt" in line
    # The same for an explicit path; with no valid one before it, the line says so.
    os.truncate(folder / "iter-000002.ckpt", 10)
    with pytest.raises(StepSearchError, match="no valid checkpoint before it"):
        select_resume(tmp_path / "run", None, str(folder / "iter-000002.ckpt"), {}, False)
    # A whole one resumes.
    _save(folder / "iter-000006.ckpt", 6)
    assert select_resume(tmp_path / "run", None, "last", {}, False)["iteration"] == 6


SAVER = textwrap.dedent("""
    import sys, torch
    from lightning.pytorch import Trainer
    from stepsearch.records.checkpoints import configure_checkpointing

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    configure_checkpointing(trainer, [])
    checkpoint = {"global_step": 2, "state_dict": {"w": torch.ones(60_000_000)}}  # 240 MB: the save takes a while
    print("ready", flush=True)
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, sys.argv[1])
    print("saved", flush=True)
""")


def test_a_kill_during_a_save_leaves_no_half_checkpoint(tmp_path):
    """SIGKILL as soon as anything appears in the checkpoint folder. Lightning's own writer builds
    the file in the system temporary folder (here another filesystem, /dev/shm) and moves it, which
    is a copy: killed mid-copy, it left a half ``iter-000002.ckpt``."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a temporary folder on another filesystem than the checkpoints")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    scratch = Path("/dev/shm") / f"stepsearch-test-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(folder / "iter-000002.ckpt")], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 300
        while not any(folder.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
    named = list(folder.glob("iter-*.ckpt"))
    assert all(checkpoint_problem(p) is None for p in named), [(p.name, p.stat().st_size) for p in named]


def test_every_checkpoint_is_kept_unless_the_config_has_a_model_checkpoint(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stepsearch.records.checkpoints import AtomicCheckpointIO

    implicit = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    configure_checkpointing(implicit, [])
    assert [c.save_top_k for c in implicit.checkpoint_callbacks] == [-1]
    assert isinstance(implicit.strategy.checkpoint_io, AtomicCheckpointIO)
    mine = ModelCheckpoint(save_top_k=2, monitor="val/em", mode="max")
    configured = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[mine], default_root_dir=tmp_path)
    configure_checkpointing(configured, [mine])
    assert [c.save_top_k for c in configured.checkpoint_callbacks] == [2]
