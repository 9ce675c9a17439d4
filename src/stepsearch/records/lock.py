"""One writer per run directory: ``run.lock``, taken by ``fit`` before it writes anything there.

The lock file holds its owner (PID, host, the process's start time, when and what command); it is
created complete (written to a temporary file, then hard-linked to ``run.lock``, which fails if the
name exists, on local disks and NFS alike) and removed when the owner ends. A second ``fit`` into the
same directory fails in one line naming the owner. An owner that died without removing it (SIGKILL,
a crashed node) leaves a stale lock: on the same host it is detected (no such PID, or the PID now
belongs to a process started at another time) and taken over; a lock held from another host is never
broken, since this host cannot see whether that process lives (the line says which file to delete).

Under DDP/FSDP2 only the launch rank 0 takes it (:func:`launch_rank`): the other ranks write nothing
of the run record, and under Lightning's launcher they re-run the command while rank 0 holds it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

from stepsearch.errors import StepSearchError

LOCK_FILE = "run.lock"


def launch_rank(trainer) -> int:
    """This process's global rank, known before ``fit`` starts (Lightning sets ``global_rank`` once it
    has launched the ranks): ``node_rank * processes per node + local_rank``, as Lightning computes it."""
    strategy = trainer.strategy
    if not hasattr(strategy, "node_rank"):  # single-device strategies
        return 0
    return int(strategy.node_rank) * int(getattr(strategy, "num_processes", 1) or 1) + int(strategy.local_rank)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or ``None``
    where there is no ``/proc`` or no such process. Tells a live owner from a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "(comm)": state is field 3


def _alive(owner: dict) -> bool:
    """Whether the owner recorded in a lock (on this host) still runs."""
    try:
        pid = int(owner["pid"])
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started', '?')}"


class RunLock:
    """``run.lock`` in ``run_dir``: :meth:`acquire` (one line if held), :meth:`release` (idempotent)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner: dict | None = None  # ours, once acquired
        self.took_over: dict | None = None  # the dead owner whose stale lock was taken over

    def read(self) -> dict | None:
        """The recorded owner, ``None`` if there is no lock (``{}`` for an unreadable one)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        mine = {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:2000]}
        tmp = self.path.with_name(f".{LOCK_FILE}.{mine['host']}.{pid}")
        tmp.write_text(json.dumps(mine, indent=1))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic; fails if the lock exists
                    self.owner = mine
                    return self
                except FileExistsError:
                    pass
                owner = self.read()
                if owner is None:
                    continue  # released between our attempt and the read: try again
                if owner and owner.get("host") == mine["host"] and owner.get("pid") == pid:
                    self.owner = mine  # ours already (acquire called twice)
                    return self
                if owner and owner.get("host") != mine["host"]:
                    raise StepSearchError(
                        f"{self.run_dir} is in use by another fit ({describe(owner)}): wait for it to end, or give "
                        f"this run another --run_dir/--seed; if that process is gone, delete {self.path}")
                if owner and _alive(owner):
                    raise StepSearchError(
                        f"{self.run_dir} is in use by another fit ({describe(owner)}): wait for it to end "
                        f"(or stop it), or give this run another --run_dir/--seed")
                # Stale: its owner on this host is dead (or the file is unreadable): take it over.
                stale = self.path.with_name(f".{LOCK_FILE}.stale.{pid}")
                try:
                    os.replace(self.path, stale)
                except FileNotFoundError:
                    continue
                try:
                    same = json.loads(stale.read_text()) == owner
                except (OSError, ValueError):
                    same = not owner
                if not same:
                    # Another process took the stale lock over first: what we moved is its fresh lock.
                    try:
                        os.link(stale, self.path)
                    except FileExistsError:
                        pass
                stale.unlink(missing_ok=True)
                self.took_over = owner or {"pid": "?", "host": "?"}
            raise StepSearchError(f"{self.path}: could not take the run lock (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.owner is None:
            return
        owner = self.read()
        if owner and owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
        self.owner = None
