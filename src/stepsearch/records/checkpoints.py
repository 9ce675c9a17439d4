"""Checkpoints a run can trust: verified before a resume, written atomically, kept by a stated rule.

- **Verification** (:func:`checkpoint_problem`, :func:`select_resume`): before a resume records
  anything (``run.json``, the MLflow run), the checkpoint it names is opened as what ``torch.save``
  writes, a zip archive: its central directory must be there and every member must lie inside the
  file (a truncated file fails here), ``data.pkl`` must be present and pass its CRC, and a file up to
  256 MiB is CRC-checked whole. FSDP2's distributed checkpoints (folders) need their ``.metadata``,
  which torch writes last. A bad checkpoint is one line (file, size, "truncated or not a
  checkpoint") naming the newest valid checkpoint before it.
- **Atomic writes** (:class:`AtomicCheckpointIO`): a checkpoint is written to ``.NAME.partial-PID``
  in its own folder, flushed to disk and renamed, so a kill during a save leaves no half file named
  like a checkpoint. (Lightning's writer builds the file in the system temporary folder and moves
  it; across filesystems that move is a copy, and a kill mid-copy left a half ``iter-*.ckpt``.)
- **Retention** (:func:`configure_checkpointing`): with no ``ModelCheckpoint`` in the config, every
  checkpoint is kept (the implicit one gets ``save_top_k=-1``): a corrupt newest checkpoint can then
  always fall back to the one before, and the quickstart writes a handful of small files. A
  configured ``ModelCheckpoint`` keeps what its ``save_top_k`` says (Lightning deletes only files it
  wrote in this process, never the checkpoint the run resumed from).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from stepsearch.errors import StepSearchError
from stepsearch.records import runs

FULL_CRC_LIMIT = 256 << 20  # bytes: files up to this size are CRC-checked whole
PARTIAL = ".partial-"  # in the name of a checkpoint being written: ``.iter-000002.ckpt.partial-PID``


def checkpoint_problem(path) -> str | None:
    """Why ``path`` is not a loadable checkpoint, or ``None`` when it looks whole."""
    path = Path(path)
    if path.is_dir():  # FSDP2 (torch distributed checkpoint): .metadata is written after the shards
        metadata = path / ".metadata"
        if not metadata.is_file() or metadata.stat().st_size == 0:
            return "a distributed checkpoint folder without its .metadata (the save did not finish)"
        return None
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            outside = [m.filename for m in members if m.header_offset + m.compress_size > size]
            if outside:
                return f"member {outside[0]} runs past the end of the file"
            pickles = [m.filename for m in members if m.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if not pickles:
                return "a zip file without data.pkl"
            archive.read(pickles[0])  # raises on a CRC mismatch
            if size <= FULL_CRC_LIMIT:
                bad = archive.testzip()
                if bad is not None:
                    return f"member {bad} fails its CRC"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    except OSError as err:
        return err.strerror or str(err)
    return None


def size_text(path) -> str:
    path = Path(path)
    try:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        return "unreadable"
    return f"{size:,} bytes"


def valid_checkpoints(run_dir: Path, below=None) -> list[Path]:
    """The run's verified checkpoints, newest (highest iteration) first; only those before
    iteration ``below`` when given."""
    folder = Path(run_dir) / runs.CHECKPOINT_DIR
    found = []
    for path in folder.glob("iter-*.ckpt") if folder.is_dir() else []:
        iteration = runs.checkpoint_iteration(path)
        if iteration is not None and (below is None or iteration < below):
            found.append((iteration, path.stat().st_mtime, path))
    return [p for _, _, p in sorted(found, reverse=True) if checkpoint_problem(p) is None]


def verify_checkpoint(path: Path, run_dir: Path, flag: str) -> None:
    """One line for a checkpoint that cannot be loaded, offering the previous valid one by name."""
    problem = checkpoint_problem(path)
    if problem is None:
        return
    iteration = runs.checkpoint_iteration(path)
    earlier = [p for p in valid_checkpoints(run_dir, below=iteration) if p.resolve() != Path(path).resolve()]
    offer = (f"the previous valid checkpoint is {earlier[0].name}: resume from it with --ckpt_path {earlier[0]}"
             if earlier else f"no valid checkpoint before it in {Path(run_dir) / runs.CHECKPOINT_DIR}")
    raise StepSearchError(f"{flag}: {path} ({size_text(path)}) is truncated or not a checkpoint ({problem}); {offer} "
                          "(move the bad file aside to use --ckpt_path last); nothing was recorded")


def select_resume(run_dir: Path, record: dict | None, ckpt_path: str, flat: dict, allow_change: bool) -> dict:
    """Which checkpoint to resume (verified), and the config changes (refused unless allowed)."""
    if ckpt_path == "last":
        checkpoint = runs.find_last_checkpoint(run_dir)
        if checkpoint is None:
            raise StepSearchError(f"--ckpt_path last: no checkpoint in {run_dir / runs.CHECKPOINT_DIR} (this config and "
                                  "seed have no run to resume); start without --ckpt_path, or pass --run_dir")
    else:
        checkpoint = Path(ckpt_path)
        if not checkpoint.exists():  # a file, or a folder (FSDP2's distributed checkpoints)
            raise StepSearchError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    verify_checkpoint(checkpoint, run_dir, f"--ckpt_path {ckpt_path}")
    changes = runs.config_changes(record["config"], flat) if record else []
    if changes and not allow_change:
        raise StepSearchError(f"resume of {run_dir} with a changed config ({'; '.join(changes)}): "
                              "pass --allow_config_change true if intended (it is recorded), or restore the settings")
    return {"checkpoint": checkpoint.resolve(), "iteration": runs.checkpoint_iteration(checkpoint), "changes": changes}


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes beside the target and renames (local paths; URLs as before)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        try:  # the rename itself reaches the disk
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            pass


def remove_partial_saves(checkpoint_dir: Path) -> list[Path]:
    """Delete what killed saves left (``.NAME.partial-PID``); call with the run lock held."""
    folder = Path(checkpoint_dir)
    leftovers = [p for p in folder.glob(f".*{PARTIAL}*")] if folder.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def configure_checkpointing(trainer, configured_callbacks) -> None:
    """Atomic writes for the run; keep every checkpoint unless the config has a ``ModelCheckpoint``
    (``configured_callbacks``: the callbacks the config instantiated)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a custom CheckpointIO is left alone
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(c, ModelCheckpoint) for c in configured_callbacks or []):
        for callback in trainer.checkpoint_callbacks:  # Lightning's implicit one: save_top_k=1 would delete
            callback.save_top_k = -1
