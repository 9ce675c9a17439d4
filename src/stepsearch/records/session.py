"""Opening a ``fit`` run and recording it: the run directory, its checks and lock, the resume
choice (:func:`open_run`), and ``run.json`` plus the MLflow run's status and tags (:class:`RunRecorder`).

Order (nothing is written until every check has passed): the run directory and the checkpoint
folders must be writable; launch rank 0 takes the run lock (``stepsearch.records.lock``); the resume's
checkpoint is verified (``stepsearch.records.checkpoints``) and its config compared with the record.
A refusal after the lock releases it and removes a run directory it had to create.

A new run is recorded at ``setup`` (``run.json``, tag ``run_dir``). A resume is recorded only once
its checkpoint has loaded (``on_fit_start``, which Lightning calls after restoring it): until then
neither ``run.json`` nor the MLflow run it names changes, and a checkpoint that fails to load
leaves the recorded run's status as it was. At that point the run goes back to RUNNING, gains
``resume_count``/``resumed_from`` (and ``config_changes_resumeN``), its ``run_dir`` tag follows a
moved folder, and the previous stop's tags (``stop_reason``, ``resume_checkpoint``, ``error``) go:
they described an end that the resume has undone (``run.json`` keeps them in the resume's entry).
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from stepsearch import lightning_adapter
from stepsearch.errors import StepSearchError
from stepsearch.records import checkpoints, runs
from stepsearch.records.lock import RunLock, launch_rank
from stepsearch.records.store import check_writable

STOP_TAGS = ("stop_reason", "resume_checkpoint", "error")  # describe how the run last ended


def run_dir_of(config, seed: int, ckpt_path) -> Path:
    """``--run_dir``; the run directory holding an explicit checkpoint; else ``{default_root_dir}/{run name}``."""
    if config.get("run_dir"):
        return Path(config["run_dir"])
    if ckpt_path not in (None, "last", "auto"):  # a checkpoint inside a run directory resumes that run
        owner = Path(str(ckpt_path)).resolve().parent.parent
        if (owner / runs.RUN_RECORD).exists():
            return owner
    root = Path(config.get("trainer.default_root_dir") or ".")
    algorithm = config.get("model.ppo.algorithm") if "model.ppo.algorithm" in config else "steppo"
    return root / runs.run_name(config.get("config"), algorithm or "steppo", seed)


def open_run(config, init, trainer, seed: int, flat: dict) -> tuple[Path, dict | None, RunLock | None]:
    """Checks, lock and resume choice, before ``fit`` writes anything: (run_dir, resume, lock).
    Sets ``init["ckpt_path"]`` to the verified checkpoint (``None``: a fresh start)."""
    ckpt_path = init.get("ckpt_path")
    run_dir = run_dir_of(config, seed, ckpt_path)
    check_writable(run_dir, "run directory (--run_dir / trainer.default_root_dir)")
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is not None:
            check_writable(callback.dirpath, "checkpoint folder (ModelCheckpoint dirpath)")
    lock, created = None, not run_dir.exists()
    if launch_rank(trainer) == 0:  # the other ranks of a DDP/FSDP2 run write nothing of the record
        lock = RunLock(run_dir).acquire()
        if lock.took_over:
            print(f"run lock: took over the stale lock of a process that is gone ({lock.took_over.get('pid')})",
                  flush=True)
    try:
        if lock is not None:
            checkpoints.remove_partial_saves(run_dir / runs.CHECKPOINT_DIR)
        record = runs.read_record(run_dir)
        if ckpt_path == "auto":  # resume if the run has a checkpoint, else start (SLURM scripts)
            ckpt_path = "last" if runs.find_last_checkpoint(run_dir) is not None else None
            init["ckpt_path"] = ckpt_path
        resume = None
        if ckpt_path is not None:
            resume = checkpoints.select_resume(run_dir, record, str(ckpt_path), flat, bool(config.get("allow_config_change")))
            init["ckpt_path"] = str(resume["checkpoint"])
        else:
            last = runs.find_last_checkpoint(run_dir)
            if last is not None:
                raise StepSearchError(
                    f"{run_dir} already holds this run (checkpoints up to PPO iteration {runs.checkpoint_iteration(last)}): "
                    "resume it with --ckpt_path last, start another with --seed S or --run_dir DIR, or delete the directory")
    except BaseException:
        close_run(lock, run_dir if created else None)
        raise
    return run_dir, resume, lock


def close_run(lock: RunLock | None, made_dir: Path | None = None) -> None:
    """Release the lock; remove ``made_dir`` if the run left nothing else in it."""
    if lock is not None:
        lock.release()
    if made_dir is not None and made_dir.is_dir() and not any(p for p in made_dir.rglob("*") if p.is_file()):
        shutil.rmtree(made_dir, ignore_errors=True)


class RunRecorder(Callback):
    """Rank 0 writes ``run.json`` for a new run at ``setup``; a resume's entry, and the MLflow run's
    return to RUNNING, wait until its checkpoint has loaded (``on_fit_start``). Until then the
    recorded run is not ours to change: ``preemption.owns_run`` is off, and so is the logger's
    ``finalize`` (Lightning would mark the run FAILED when the checkpoint fails to load)."""

    def __init__(self, run_dir: Path, flat: dict, resume: dict | None, preemption=None):
        self.run_dir, self.flat, self.resume, self.preemption = Path(run_dir), flat, resume, preemption
        self.restore_finalize = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        record = runs.read_record(self.run_dir) if self.resume is not None else None
        if self.resume is not None and record is not None:
            self._hold(trainer)
            return
        # A new run; or a resume from a checkpoint of no recorded run (copied from elsewhere).
        client, run_id = runs.mlflow_run(trainer.logger)
        mlflow = None
        if client is not None:
            mlflow = {"run_id": run_id, "tracking_uri": lightning_adapter.mlflow_tracking_uri(trainer.logger),
                      "experiment_id": client.get_run(run_id).info.experiment_id}
            client.set_tag(run_id, "run_dir", str(self.run_dir.resolve()))
        runs.write_record(self.run_dir, {"created": _now(), "mlflow": mlflow, "config": self.flat, "resumes": []})

    def _hold(self, trainer) -> None:
        if self.preemption is not None:
            self.preemption.owns_run = False
        for logger in trainer.loggers:
            if "finalize" not in vars(logger):
                logger.finalize = lambda status="success": None
                self.restore_finalize = self.restore_finalize or []
                self.restore_finalize.append(logger)

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in self.restore_finalize or []:
            del logger.finalize  # back to the class's
        self.restore_finalize = None
        if self.preemption is not None:
            self.preemption.owns_run = True
        if not trainer.is_global_zero or self.resume is None:
            return
        record = runs.read_record(self.run_dir)
        if record is None:
            return
        client, run_id = runs.mlflow_run(trainer.logger)
        previous = {}
        if client is not None:
            tags = client.get_run(run_id).data.tags
            previous = {k: tags[k] for k in STOP_TAGS if k in tags}
            for key in previous:
                client.delete_tag(run_id, key)
            client.set_tag(run_id, "run_dir", str(self.run_dir.resolve()))
        resumes = record["resumes"]
        resumes.append({"time": _now(), "checkpoint": str(self.resume["checkpoint"]),
                        "iteration": self.resume["iteration"], "config_changes": self.resume["changes"],
                        **({"previous_end": previous} if previous else {})})
        record["config"] = self.flat  # the next resume compares with the settings now in force
        tags = {"resume_count": len(resumes), "resumed_from": self.resume["checkpoint"]}
        if self.resume["changes"]:
            tags[f"config_changes_resume{len(resumes)}"] = "; ".join(self.resume["changes"])
        runs.mark_run(trainer.logger, "RUNNING", tags)
        runs.write_record(self.run_dir, record)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
