"""Exact continuation with two DDP processes (gloo, CPU): a 2-rank ``fit`` killed (SIGKILL, both
ranks) after a checkpoint and resumed with ``--ckpt_path last`` ends with the parameters and the
metric history of an uninterrupted 2-rank run: each rank's data shard, RNG states and the
iteration counter come back."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from cli_runs import kill_started_processes  # noqa: F401  (autouse fixture: no child outlives a test)
from cli_runs import fit_args, mlflow_client, run_cli, start_cli, wait_for
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 3
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
       "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "3",
       "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
       "--trainer.callbacks.save_top_k", "-1")


def _fit(root, run, *extra):
    return fit_args(root, *DDP, "--run_dir", str(root / run), *extra)


def _history(client, run_dir, key):
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string=f"tags.run_dir = '{run_dir.resolve()}'")
    return run, sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_two_rank_run_killed_and_resumed_matches_an_uninterrupted_one(tmp_path):
    reference = run_cli(_fit(tmp_path, "A"), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    proc = start_cli(_fit(tmp_path, "B"), cwd=tmp_path, log=tmp_path / "B.log")
    wait_for(lambda: (tmp_path / "B" / "checkpoints" / "iter-000001.ckpt").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks
    proc.wait(timeout=60)
    resumed = run_cli(_fit(tmp_path, "B", "--ckpt_path", "last"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    client = mlflow_client(tmp_path)
    for key in ("train/reward", "train/policy_loss", "val/em"):
        run_b, ours = _history(client, tmp_path / "B", key)
        _, theirs = _history(client, tmp_path / "A", key)
        assert [s for s, _ in ours] == [s for s, _ in theirs], key
        assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-6, abs=1e-9), key
    assert run_b.info.status == "FINISHED" and run_b.data.tags["resume_count"] == "1"
    ours, theirs = (load_file(str(tmp_path / r / "policy" / "model.safetensors")) for r in ("B", "A"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ckpt = torch.load(tmp_path / "B" / "checkpoints" / "iter-000003.ckpt", map_location="cpu", weights_only=False)
    assert len(ckpt["rng_states"]) == 2  # every rank's
