"""Runs that survive: stable run directories, resume records, fingerprints, and preemption signals.

A ``fit`` run lives in one directory, named from the config and seed rather than from a fresh
MLflow id, so that a new process finds it again::

    {trainer.default_root_dir}/{config stem(s)}-{algorithm}-seed{S}/
        run.json                  the record: MLflow run id and store, the flattened config, resumes
        run.lock                  while a fit writes here: its PID and host (stepsearch.records.lock)
        checkpoints/iter-000006.ckpt   one file per saved PPO iteration, written atomically, never
                                  overwritten, all kept by default (stepsearch.records.checkpoints)

``fit --ckpt_path last`` resumes the highest iteration found there into the *same* MLflow run. A
resume whose config differs from the record is refused, naming the changed fields, unless
``--allow_config_change true`` (the changes are then recorded in ``run.json`` and as MLflow tags).
Each (metric, step) is logged once (:class:`LogOnce`): an iteration's metrics are flushed before its
checkpoint is written, and a resumed run does not repeat what the killed process logged. The RNG
states and the data order are in ``stepsearch.data.continuation``.

Signals (:class:`PreemptionCallback`): SIGTERM and SIGUSR1 (SLURM's warning signal) set a flag; at
the next PPO-iteration boundary every rank agrees to stop, a checkpoint is written, the MLflow run
is marked KILLED, under SLURM with ``SLURMEnvironment(auto_requeue=True)`` the job is requeued
(``scontrol requeue``, as Lightning's own handler does), and the process exits ``128 + signal``.
Departure from Lightning: its SLURM handler saves an ``hpc_ckpt`` from inside the signal handler,
mid-iteration, outside the run directory; ours waits for the iteration boundary. Ctrl-C ends with
one line and the run KILLED; any other exception marks the run FAILED with the error line as the
``error`` tag. The in-process JVM is started with ``-Xrs`` (``stepsearch.java``) so that it leaves
these signals to Python.

Fingerprints (:func:`check_fingerprint`): a cached artefact (tiny model, warm-start) is reused only
when the settings that made it, stored beside it in ``stepsearch_fingerprint.json``, match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from stepsearch import lightning_adapter
from stepsearch.errors import StepSearchError

RUN_RECORD = "run.json"
CHECKPOINT_DIR = "checkpoints"
# {step} = PPO iterations done: ModelCheckpoint fills it from the ``step`` StepSearchPPO logs after
# each iteration (its own counter), PreemptionCallback from the same counter.
CHECKPOINT_NAME = "iter-{step:06d}"
FINGERPRINT_FILE = "stepsearch_fingerprint.json"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

# Settings that may differ between a run and its resume without changing what is trained.
# Where the run's records live is not what is trained: a run folder moved with its new root
# (``--trainer.default_root_dir``) resumes without ``--allow_config_change``. Input paths still count.
RESUME_INVARIANT_KEYS = ("ckpt_path", "config", "allow_config_change", "run_dir", "trainer.enable_progress_bar",
                         "trainer.logger.init_args.run_id", "trainer.enable_model_summary", "weights_only",
                         "trainer.default_root_dir", "predictions_file")


# ------------------------------------------------------------------------------------- run directory

def run_name(config_files, algorithm: str, seed: int) -> str:
    """``{stem[+stem...]}-{algorithm}-seed{S}``: the config files' stems (``fit`` without any)."""
    stems = [Path(str(getattr(f, "relative", f))).stem for f in (config_files or [])]
    stem = "+".join(dict.fromkeys(stems)) or "fit"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", f"{stem}-{algorithm}-seed{seed}")


def flat_config(config) -> dict:
    """A parsed config (jsonargparse Namespace or dict) as ``{"a.b.c": value}`` with JSON values."""
    data = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            out[prefix] = json.loads(json.dumps(value, default=str))

    walk("", data)
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (resume-invariant keys ignored)."""
    def invariant(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_INVARIANT_KEYS)

    keys = sorted(k for k in set(old) | set(new) if not invariant(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StepSearchError(f"{path}: unreadable run record ({err}); delete it to start the run over") from None


def write_record(run_dir: Path, record: dict) -> None:
    """Write ``run.json`` atomically (a kill mid-write leaves the old record)."""
    path = Path(run_dir) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


_ITERATION = re.compile(r"iter-(\d+)(?:-v\d+)?\.ckpt$")


def checkpoint_iteration(path) -> int | None:
    match = _ITERATION.search(str(path))
    return int(match.group(1)) if match else None


def find_last_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest PPO iteration under ``run_dir/checkpoints`` (newest on a tie)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(checkpoint_iteration(p), p.stat().st_mtime, p) for p in folder.glob("iter-*.ckpt")] if folder.is_dir() else []
    found = [f for f in found if f[0] is not None]
    return max(found)[2] if found else None


# ------------------------------------------------------------------------------------- fingerprints

def fingerprint(settings: dict) -> str:
    """sha256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path) -> str:
    """sha256 of a file's bytes, or ``missing`` (part of a fingerprint: inputs that made an artefact)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_fingerprint(path) -> dict:
    """The stored fingerprint record at ``path`` (``fingerprint`` and ``settings``); one-line error if corrupt."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StepSearchError(f"{path}: unreadable fingerprint ({type(err).__name__}: {err}); "
                              "delete the file (and its artefact) to rebuild") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings", {}), dict) \
            or not isinstance(record.get("fingerprint"), str):
        raise StepSearchError(f"{path}: not a fingerprint record (needs a string 'fingerprint' and a 'settings' "
                              "object); delete the file (and its artefact) to rebuild")
    return record


def check_fingerprint(out_dir, settings: dict, what: str, setting: str, upgrade=None) -> bool:
    """Whether ``out_dir`` holds an artefact made by exactly ``settings`` (then reuse it).

    ``False`` when ``out_dir`` holds no artefact yet (make it, then :func:`write_fingerprint`).
    Raises a one-line :class:`StepSearchError` naming the changed settings when it was made by other
    settings, or by unknown ones (no fingerprint beside it): reusing it would make the run record
    lie, and deleting it silently could destroy another run's input. ``upgrade`` maps stored
    settings written by an older version onto today's form (e.g. fields dropped since) before comparing.
    """
    out = Path(out_dir)
    if not (out / "config.json").exists():
        return False
    stored_path = out / FINGERPRINT_FILE
    if not stored_path.exists():
        raise StepSearchError(f"{setting}: {out} holds a {what} made by unknown settings (no {FINGERPRINT_FILE}); "
                              f"delete it to rebuild, or point {setting} at a new directory")
    stored = read_fingerprint(stored_path).get("settings", {})
    if upgrade is not None:
        stored = upgrade(stored)
    if fingerprint(stored) == fingerprint(settings):
        return True
    old, new = flat_config(stored), flat_config(settings)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    raise StepSearchError(f"{setting}: {out} holds a {what} made with other settings (changed: {', '.join(changed)}); "
                          f"delete it to rebuild, or point {setting} at a new directory")


def write_fingerprint(out_dir, settings: dict, what: str) -> None:
    path = Path(out_dir) / FINGERPRINT_FILE
    path.write_text(json.dumps({"what": what, "fingerprint": fingerprint(settings), "settings": settings},
                               indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------- MLflow status

def mlflow_run(logger):
    """(client, run_id) of an MLflow logger whose run exists in this process, else (None, None)."""
    if logger is None or type(logger).__name__ != "MLFlowLogger" or not lightning_adapter.mlflow_run_started(logger):
        return None, None
    return logger.experiment, logger.run_id


def mark_run(logger, status: str, tags: dict | None = None) -> None:
    """Set the MLflow run's status (``RUNNING``/``KILLED``/``FAILED``/``FINISHED``) and tags."""
    client, run_id = mlflow_run(logger)
    if client is None:
        return
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:5000])
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


class LogOnce:
    """A logger's ``log_metrics`` that logs each (metric, step) once.

    Two callers need it. :class:`PreemptionCallback` flushes an iteration's metrics before its
    checkpoint is written (Lightning logs them after ``on_train_batch_end``, where checkpoints are
    saved, so a kill right after a checkpoint lost the iteration's metrics: a gap); Lightning's own
    later flush is then a repeat. And a resumed run recomputes iterations past its checkpoint that
    the killed process may already have logged (``client``/``run_id`` given: the store is asked once
    per metric): exact continuation makes them equal, and a difference is counted in the tag
    ``resume_metric_mismatches``, so the record says so.
    """

    def __init__(self, logger, client=None, run_id: str | None = None):
        self.logger, self.client, self.run_id = logger, client, run_id
        self.original = logger.log_metrics
        self.logged: dict[str, dict[int, float]] = {}
        self.mismatches = 0

    def __call__(self, metrics: dict, step: int | None = None) -> None:
        if step is None:
            return self.original(metrics, step)
        fresh = {}
        for key, value in metrics.items():
            if key not in self.logged:
                self.logged[key] = ({m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}
                                    if self.client is not None else {})
            old = self.logged[key].get(int(step))
            if old is None:
                fresh[key] = value
                self.logged[key][int(step)] = float(value)
            elif abs(float(old) - float(value)) > 1e-6 * (1.0 + abs(float(old))) and self.client is not None:
                self.mismatches += 1
                self.client.set_tag(self.run_id, "resume_metric_mismatches", str(self.mismatches))
        if fresh:
            self.original(fresh, step)


def error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# ------------------------------------------------------------------------------------- signals

class PreemptionCallback(Callback):
    """Checkpoint-and-stop on SIGTERM/SIGUSR1 at the next PPO-iteration boundary; status in MLflow.

    Handlers are installed twice: by :meth:`install` before ``fit`` (so a signal during data or
    warm-start preparation is remembered; Lightning then keeps them), and again at
    ``on_train_start``, replacing Lightning's own (which would stop mid-validation, or save an HPC
    checkpoint mid-iteration). After ``fit``, :attr:`stopped` holds the signal name and
    :attr:`checkpoint` the checkpoint written for it; :attr:`interrupted` is set by Ctrl-C.
    """

    def __init__(self, checkpoint_dir: Path, requeue: bool = False):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.requeue = requeue
        self.requested: str | None = None
        self.stopped: str | None = None
        self.checkpoint: Path | None = None
        self.interrupted = False
        self.owns_run = True  # off while a resume's checkpoint has not loaded (records.session.RunRecorder)
        self._trainer = None

    def install(self) -> None:
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.requested is None
        self.requested = signal.Signals(signum).name
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # DDP children started by this process get it too (as Lightning does)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self.install()
        # Resumed from a checkpoint written just before a scheduled validation: Lightning skips that
        # validation on restart ("fast-forward"); run it, so the history has no hole at this step.
        step, interval = _iteration(trainer), trainer.val_check_interval
        if (step > 0 and isinstance(interval, int) and step % interval == 0 and hasattr(pl_module, "validation_pass")
                and pl_module.last_val_step != step):
            pl_module.validation_pass("last")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The iteration's metrics go to the loggers now, before any checkpoint of it is written
        # (Lightning would log them after this hook; its repeat is dropped by LogOnce).
        lightning_adapter.flush_train_step_metrics(trainer)
        stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if not stop:
            return
        self.stopped = self.requested or "SIGTERM"
        self.checkpoint = self._save(trainer)
        trainer.should_stop = True  # StepSearchPPO reads stop_signal(trainer): no export / final validation

    def on_train_end(self, trainer, pl_module) -> None:
        """The final iteration is checkpointed too (after its last validation), unless just saved."""
        if self.stopped is not None or not trainer.checkpoint_callbacks:
            return
        if hasattr(pl_module, "final_validation"):
            pl_module.final_validation()
        self._save(trainer)

    def _save(self, trainer) -> Path:
        """Save at this boundary unless a checkpoint of this iteration was just written."""
        step = trainer.global_step
        callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        for callback in callbacks:
            saved_step, saved_path = lightning_adapter.last_checkpoint_saved(callback)
            if saved_step == step and saved_path:
                return Path(saved_path)
        path = self.checkpoint_dir / (CHECKPOINT_NAME.format(step=_iteration(trainer)) + ".ckpt")
        if path.exists():  # never overwrite: a resumed-from-earlier run keeps both
            version = 1
            while path.with_name(f"{path.stem}-v{version}.ckpt").exists():
                version += 1
            path = path.with_name(f"{path.stem}-v{version}.ckpt")
        trainer.save_checkpoint(path)
        for callback in callbacks:  # the iteration's scheduled save would be a second copy
            lightning_adapter.mark_checkpoint_saved(callback, step)
        return path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            return
        if trainer.is_global_zero and self.owns_run:
            mark_run(trainer.logger, "FAILED", {"error": error_line(exception)})

    def after_fit(self, trainer) -> int:
        """Mark the MLflow run, requeue under SLURM, print one line. Returns the exit code (0: done)."""
        if self.interrupted:
            if trainer.is_global_zero and self.owns_run:
                mark_run(trainer.logger, "KILLED", {"stop_reason": "KeyboardInterrupt"})
            return 130
        if self.stopped is None:
            return 0
        code = 128 + int(getattr(signal, self.stopped))
        if trainer.is_global_zero:
            mark_run(trainer.logger, "KILLED", {"stop_reason": self.stopped, "resume_checkpoint": self.checkpoint})
            requeued = self.requeue and _slurm_requeue()
            print(f"stopped by {self.stopped} after PPO iteration {trainer.global_step}: checkpoint {self.checkpoint}; "
                  + ("SLURM job requeued" if requeued else "resume with --ckpt_path last"), file=sys.stderr, flush=True)
        return code


def stop_signal(trainer) -> str | None:
    """The signal that stopped this ``fit`` at an iteration boundary (its :class:`PreemptionCallback`), else ``None``."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, PreemptionCallback) and callback.stopped:
            return callback.stopped
    return None


def _iteration(trainer) -> int:
    """PPO iterations done: the module's own counter (``StepSearchPPO.ppo_iterations``), else ``global_step``."""
    return int(getattr(trainer.lightning_module, "ppo_iterations", trainer.global_step))


def _slurm_requeue() -> bool:
    """``scontrol requeue`` this SLURM job (Lightning's command, array jobs included)."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        return subprocess.call(["scontrol", "requeue", job]) == 0
    except OSError:
        return False
