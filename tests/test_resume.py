"""Runs that survive (``stepsearch.records.runs``), driven as a user would: ``python -m stepsearch fit`` in
subprocesses on a tiny quickstart, killed (SIGKILL), preempted (SIGTERM), interrupted (Ctrl-C) and
resumed with ``--ckpt_path last``; the MLflow store and the checkpoints are read back.

One bootstrap (world, tiny model, warm-start) is made by the first run and reused by the others
through its fingerprint; every run has its own ``--run_dir``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import kill_started_processes  # noqa: F401  (autouse fixture: no child outlives a test)
from cli_runs import QUICKSTART, cli_env, error_lines, fit_args, mlflow_client, run_cli, run_in_process, start_cli, started, wait_for
from safetensors.torch import load_file
from training_fixtures import PYTHON, REPO

pytestmark = pytest.mark.slow

STEPS = 4  # PPO iterations; validation and a checkpoint every 2 (all checkpoints kept)
SCHEDULE = ("--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2",
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
    """The reference: 4 iterations in one process (it makes the bootstrap the others reuse)."""
    proc = run_cli(_fit(root, "A"), cwd=root)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_uninterrupted_run_records(root, uninterrupted):
    client, run = _run_of(root, "A")
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in _history(client, run.info.run_id, "train/reward")]
    assert steps == list(range(STEPS))
    assert [s for s, _ in _history(client, run.info.run_id, "val/em")] == [0, 2, 4]
    names = sorted(p.name for p in (root / "A" / "checkpoints").glob("*.ckpt"))
    assert names == ["iter-000002.ckpt", "iter-000004.ckpt"]
    for name in names:  # the name carries the PPO iterations the checkpoint holds
        ckpt = torch.load(root / "A" / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == ckpt["ppo_iteration"] == int(name[5:11])


def test_killed_run_resumes_into_the_same_run_exactly(root, uninterrupted):
    log = root / "B.log"
    proc = start_cli(_fit(root, "B"), cwd=root, log=log)
    # Killed as soon as iteration 2's checkpoint exists: before (or during) the validation due at 2,
    # which Lightning skips on restart unless the run makes it up.
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
    wait_for(lambda: (root / "C" / "run.json").exists(), proc)  # mid-fit (the step-0 validation or later)
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

    resumed = run_cli(_fit(root, "C", "--ckpt_path", "auto"), cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = _run_of(root, "C")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/reward")] == list(range(STEPS))
    ours, theirs = _policy(root, "C"), _policy(root, "A")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ctrl_c_is_one_line_and_marks_the_run_killed(root, uninterrupted):
    proc = start_cli(_fit(root, "D"), cwd=root, log=root / "D.log")
    wait_for(lambda: (root / "D" / "run.json").exists(), proc)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    text = (root / "D.log").read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text
    (line,) = error_lines(text)
    assert "interrupted (Ctrl-C)" in line and "KILLED" in line
    _, run = _run_of(root, "D")
    assert run.info.status == "KILLED"


def test_resume_refuses_a_changed_config_unless_allowed(root, uninterrupted, capsys, monkeypatch):
    monkeypatch.chdir(root)
    code, text = run_in_process(_fit(root, "A", "--ckpt_path", "last", "--model.ppo.kl_coef", "0.5"), capsys, monkeypatch)
    assert code == 2
    (line,) = error_lines(text)
    assert "model.ppo.kl_coef: 0.001 -> 0.5" in line and "--allow_config_change" in line

    code, text = run_in_process(_fit(root, "A"), capsys, monkeypatch)  # a new run into a directory that holds one
    assert code == 2
    (line,) = error_lines(text)
    assert "already holds this run" in line and "--ckpt_path last" in line

    code, text = run_in_process(_fit(root, "E", "--ckpt_path", "last"), capsys, monkeypatch)
    assert code == 2
    (line,) = error_lines(text)
    assert "no checkpoint" in line


def test_changed_warm_start_settings_are_refused_not_silently_reused(root, uninterrupted, capsys, monkeypatch):
    """The cached warm-start was made with 1 epoch; asking for 2 must not train on the old one
    while MLflow records 2."""
    monkeypatch.chdir(root)
    code, text = run_in_process(_fit(root, "F", "--model.bootstrap.warm_start.epochs", "2"), capsys, monkeypatch)
    assert code == 2, text[-2000:]
    (line,) = error_lines(text)
    assert "model.model.name_or_path" in line and "epochs" in line and "delete it to rebuild" in line
    assert not (root / "F" / "checkpoints").exists()


def test_an_intended_config_change_on_resume_is_recorded(root, uninterrupted):
    """Extending the finished reference run by one iteration (the common intended change). Runs
    last: it changes run A."""
    proc = run_cli(_fit(root, "A", "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 1),
                        "--allow_config_change", "true"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = _run_of(root, "A")
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    assert run.data.tags["config_changes_resume1"] == f"trainer.max_steps: {STEPS} -> {STEPS + 1}"
    assert [s for s, _ in _history(client, run.info.run_id, "train/reward")] == list(range(STEPS + 1))
    # the last validation runs at the final iteration, 5, though the schedule validates every 2
    assert [s for s, _ in _history(client, run.info.run_id, "val/em")] == [0, 2, 4, 5]
    import json

    record = json.loads((root / "A" / "run.json").read_text())
    assert record["resumes"][0]["config_changes"] == [f"trainer.max_steps: {STEPS} -> {STEPS + 1}"]
    assert record["resumes"][0]["iteration"] == STEPS
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "config_resume1.yaml"}


def test_rng_states_round_trip():
    """What the checkpoint keeps of the RNGs restores the draws (Python, NumPy, torch)."""
    import random
    from types import SimpleNamespace

    import numpy as np

    from stepsearch.data.continuation import all_rng_states, set_rng_state

    (state,) = all_rng_states(SimpleNamespace(world_size=1))
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_predict_writes_its_predictions_where_it_says(root, uninterrupted):
    out = root / "preds" / "test_predictions.jsonl"
    args = fit_args(root, "--model.model.name_or_path", str(root / "A" / "policy"), "--predictions_file", str(out))
    proc = run_cli(["predict", *args[1:]], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    test_questions = [json.loads(line)["question"] for line in (root / "seed0" / "world" / "test.jsonl").open()]
    assert [r["question"] for r in rows] == test_questions
    assert all({"prediction", "answers", "searches"} <= set(r) for r in rows)
    assert f"predictions: {len(rows)} rows written to {out}" in proc.stdout


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_slurm_script_requeues_on_sigusr1_and_the_requeued_job_resumes(root, uninterrupted, tmp_path):
    """``experiments/slurm_fit.sh`` under a simulated SLURM job (``srun`` runs the command, a fake
    ``scontrol`` records its arguments): SLURM's warning signal (SIGUSR1, to the job step only, as
    ``--signal=USR1@300`` sends it) checkpoints, marks the run KILLED, requeues the job and exits
    138. (The requeued start runs the same command, ``--ckpt_path auto``: resuming with it is
    checked by the SIGTERM test.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**cli_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": PYTHON, "SEED": "0",
           "CONFIG": str(QUICKSTART), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "stepsearch", "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    script = [str(REPO / "experiments" / "slurm_fit.sh"), *_fit(root, "G")[3:]]  # after `fit --config X`
    with open(tmp_path / "job.log", "w") as log:
        job = started(subprocess.Popen(script, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True))
        wait_for(lambda: (root / "G" / "run.json").exists(), job)
        (step,) = _children(job.pid)  # the job step: srun exec'd python
        os.kill(step, signal.SIGUSR1)
        code = job.wait(timeout=300)
    text = (tmp_path / "job.log").read_text()
    assert code == 128 + signal.SIGUSR1, text[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert any(line.startswith("stopped by SIGUSR1") and line.endswith("SLURM job requeued") for line in text.splitlines())
    _, run = _run_of(root, "G")
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "SIGUSR1"
