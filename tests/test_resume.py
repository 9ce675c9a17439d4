"""Runs that survive (``stepsearch.runs``), driven as a user would: ``python -m stepsearch fit`` in
subprocesses on a tiny quickstart, killed (SIGKILL), preempted (SIGTERM), interrupted (Ctrl-C) and
resumed with ``--ckpt_path last``; the MLflow store and the checkpoints are read back.

One bootstrap (world, tiny model, warm-start) is made by the first run and reused by the others
through its fingerprint; every run has its own ``--run_dir``.
"""

from __future__ import annotations

import signal

import pytest
import torch
from cli_runs import error_lines, fit_args, mlflow_client, run_cli, start_cli, wait_for
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 6  # PPO iterations; validation every 3; a checkpoint every 2 (all kept)
SCHEDULE = ("--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "3",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2",
            "--trainer.callbacks.save_top_k", "-1")


def _fit(root, run, *extra):
    return fit_args(root, *SCHEDULE, "--run_dir", str(root / run), *extra)


def _run_of(root, run):
    """The MLflow run of run directory ``root/run`` (exactly one)."""
    client = mlflow_client(root)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.run_dir = '{(root / run).resolve()}'")
    assert len(found) == 1, [r.info.run_id for r in found]
    return client, found[0]


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _policy(root, run):
    return load_file(str(root / run / "policy" / "model.safetensors"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def uninterrupted(root):
    """The reference: 6 iterations in one process (it makes the bootstrap the others reuse)."""
    proc = run_cli(_fit(root, "A"), cwd=root)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_uninterrupted_run_records(root, uninterrupted):
    client, run = _run_of(root, "A")
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in _history(client, run.info.run_id, "train/reward")]
    assert steps == list(range(STEPS))
    assert [s for s, _ in _history(client, run.info.run_id, "val/em")] == [0, 3, 6]
    names = sorted(p.name for p in (root / "A" / "checkpoints").glob("*.ckpt"))
    assert names == ["iter-000002.ckpt", "iter-000004.ckpt", "iter-000006.ckpt"]
    for name in names:  # the name carries the PPO iterations the checkpoint holds
        ckpt = torch.load(root / "A" / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == ckpt["ppo_iteration"] == int(name[5:11])


def test_killed_run_resumes_into_the_same_run_exactly(root, uninterrupted):
    log = root / "B.log"
    proc = start_cli(_fit(root, "B"), cwd=root, log=log)
    wait_for(lambda: (root / "B" / "checkpoints" / "iter-000002.ckpt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    client, killed = _run_of(root, "B")
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves; the resume takes the run over

    resumed = run_cli(_fit(root, "B", "--ckpt_path", "last"), cwd=root)
    assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-3000:])
    client, run = _run_of(root, "B")
    _, reference = _run_of(root, "A")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resume_count"] == "1" and "resume_metric_mismatches" not in run.data.tags
    for key in ("train/reward", "train/policy_loss", "train/kl", "val/em", "val/f1", "val/reward"):
        history = _history(client, run.info.run_id, key)
        expected = _history(client, reference.info.run_id, key)
        assert [s for s, _ in history] == [s for s, _ in expected], key  # no gap, no duplicate
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-9), key
    ours, theirs = _policy(root, "B"), _policy(root, "A")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The before/after table still compares with step 0 (kept in the checkpoint).
    summary = client.download_artifacts(run.info.run_id, "summary.md", str(root / "dl_B"))
    rows = [line.split("|") for line in open(summary) if line.startswith("| val/em")]
    assert rows and all(cell.strip() for cell in rows[0][1:5])


def test_sigterm_checkpoints_at_the_iteration_boundary_and_resume_completes(root, uninterrupted):
    proc = start_cli(_fit(root, "C"), cwd=root, log=root / "C.log")
    wait_for(lambda: (root / "C" / "run.json").exists() and _metric_count(root, "C") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    text = (root / "C.log").read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text
    saved = sorted((root / "C" / "checkpoints").glob("iter-*.ckpt"))
    assert saved, text[-2000:]
    stop_line = [line for line in text.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stop_line) == 1 and saved[-1].name in stop_line[0]
    client, run = _run_of(root, "C")
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "SIGTERM"
    assert not (root / "C" / "policy").exists()  # nothing exported as "trained" from a stopped run

    resumed = run_cli(_fit(root, "C", "--ckpt_path", "last"), cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = _run_of(root, "C")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/reward")] == list(range(STEPS))
    ours, theirs = _policy(root, "C"), _policy(root, "A")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _metric_count(root, run) -> int:
    try:
        client, found = _run_of(root, run)
    except AssertionError:
        return 0
    return len(client.get_metric_history(found.info.run_id, "train/reward"))


def test_ctrl_c_is_one_line_and_marks_the_run_killed(root, uninterrupted):
    proc = start_cli(_fit(root, "D"), cwd=root, log=root / "D.log")
    wait_for(lambda: _metric_count(root, "D") >= 1, proc)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    text = (root / "D.log").read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text
    (line,) = error_lines(text)
    assert "interrupted (Ctrl-C)" in line and "KILLED" in line
    _, run = _run_of(root, "D")
    assert run.info.status == "KILLED"


def test_resume_refuses_a_changed_config_unless_allowed(root, uninterrupted):
    changed = run_cli(_fit(root, "A", "--ckpt_path", "last", "--model.ppo.kl_coef", "0.5"), cwd=root)
    assert changed.returncode == 2
    (line,) = error_lines(changed.stdout + changed.stderr)
    assert "model.ppo.kl_coef: 0.001 -> 0.5" in line and "--allow_config_change" in line

    fresh = run_cli(_fit(root, "A"), cwd=root)  # a new run into a directory that holds one
    assert fresh.returncode == 2
    (line,) = error_lines(fresh.stdout + fresh.stderr)
    assert "already holds this run" in line and "--ckpt_path last" in line

    nothing = run_cli(_fit(root, "E", "--ckpt_path", "last"), cwd=root)
    assert nothing.returncode == 2
    (line,) = error_lines(nothing.stdout + nothing.stderr)
    assert "no checkpoint" in line
