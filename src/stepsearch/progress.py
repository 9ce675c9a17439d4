"""Progress a log file can see: a rich bar on a terminal, a plain line every N seconds otherwise.

Long steps (the synthetic world, an index build, the tiny model, collecting demonstrations, the
warm-start epochs, PPO iterations, an evaluation) report through :class:`Progress`. When stdout is a
terminal it draws a rich bar as before; when it is not (``fit ... > run.log``, a cluster job), it
prints one plain line when the step starts, one every ``every`` seconds while it runs, and one when
it ends, e.g.::

    warm-start: 120/800 steps (15%), 3.2 steps/s, ETA 3m32s, loss 0.532
    warm-start: 800/800 steps (100%), 3.1 steps/s, done in 4m18s, loss 0.101

``every`` defaults to ``$STEPSEARCH_PROGRESS_EVERY`` seconds, else 30. :func:`step` is the same for
work without a count (one line at the start, one with the time taken at the end), and
:func:`task_progress` gives code written against rich's multi-task ``Progress`` (``add_task``,
``advance``, ``update``) the same plain lines when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from stepsearch.errors import ConfigError

DEFAULT_EVERY_S = 30.0
EVERY_ENV = "STEPSEARCH_PROGRESS_EVERY"


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like object without isatty
        return False


def default_every() -> float:
    """Seconds between plain lines: ``$STEPSEARCH_PROGRESS_EVERY`` (a number >= 0) or 30."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"${EVERY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) and 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def plural(unit: str) -> str:
    """``step`` -> ``steps``, ``batch`` -> ``batches``."""
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def _rate_text(rate: float, unit: str) -> str:
    """``3.2 steps/s``, or ``8.1 s/step`` when slower than one per second."""
    if rate <= 0 or not math.isfinite(rate):
        return f"? {plural(unit)}/s"
    if rate >= 1:
        return f"{rate:.1f} {plural(unit)}/s"
    return f"{1 / rate:.1f} s/{unit}"


def progress_line(label: str, done: int, total: int | None, elapsed: float, unit: str = "item",
                  fields: dict | None = None, counted_from: int = 0, finished: bool = False) -> str:
    """One plain progress line. The rate counts only what this process did (``done - counted_from``
    in ``elapsed`` seconds), so a resumed run's ETA is not flattered by iterations made before."""
    parts = []
    if total:
        parts.append(f"{done}/{total} {plural(unit)} ({100 * done / total:.0f}%)")
    else:
        parts.append(f"{done} {plural(unit)}")
    made = done - counted_from
    rate = made / elapsed if elapsed > 0 and made > 0 else 0.0
    if made > 0:
        parts.append(_rate_text(rate, unit))
    if finished:
        parts.append(f"done in {format_duration(elapsed)}")
    elif total and rate > 0:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    parts += [f"{key} {_format_value(value)}" for key, value in (fields or {}).items()]
    return f"{label}: " + ", ".join(parts)


class Progress:
    """Progress of one counted step (``done`` of ``total`` ``unit``\\ s), as a bar or as plain lines.

    Use as a context manager; ``advance(n, **fields)`` or ``update(done=..., **fields)`` as work is
    done; ``fields`` (``loss=0.53``) are shown after the counts. ``terminal=None`` decides by stdout;
    ``every=0`` prints a plain line on every update.
    """

    def __init__(self, label: str, total: int | None, *, unit: str = "item", every: float | None = None,
                 terminal: bool | None = None, start: int = 0, stream=None, clock=time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.every = default_every() if every is None else every
        self.terminal = is_terminal(stream) if terminal is None else terminal
        self.done = self.counted_from = start
        self.fields: dict = {}
        self._stream, self._clock = stream, clock
        self._started = self._last_line = clock()
        self._closed = False
        self._bar = self._task = None
        if self.terminal:
            self._start_bar()
        else:
            self._print()

    # --------------------------------------------------------------- updates
    def advance(self, n: int = 1, **fields) -> None:
        self.update(done=self.done + n, **fields)

    def update(self, done: int | None = None, total: int | None = None, **fields) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total, fields=self._fields_text())
        elif not self.terminal and self._clock() - self._last_line >= self.every \
                and not (self.total and self.done >= self.total):  # the last line is close()'s
            self._print()

    def line(self, finished: bool = False) -> str:
        return progress_line(self.label, self.done, self.total, self._clock() - self._started, self.unit,
                             self.fields, self.counted_from, finished)

    def close(self) -> None:
        """The final line (plain) or the bar's last state (terminal); once."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
        else:
            self._print(finished=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._closed = True
            self._bar.stop()

    # --------------------------------------------------------------- output
    def _print(self, finished: bool = False) -> None:
        stream = self._stream or sys.stdout
        print(self.line(finished), file=stream, flush=True)
        self._last_line = self._clock()

    def _fields_text(self) -> str:
        return ", ".join(f"{key} {_format_value(value)}" for key, value in self.fields.items())

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console = Console(file=self._stream) if self._stream is not None else None
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[fields]}"),
                                 console=console, transient=False)
        self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, fields="")
        self._bar.start()


@contextlib.contextmanager
def step(label: str, stream=None, clock=time.monotonic):
    """Uncounted work: ``label ...`` at the start, ``label: done in 3s`` at the end (on any stdout)."""
    stream = stream or sys.stdout
    print(f"{label} ...", file=stream, flush=True)
    started = clock()
    yield
    print(f"{label}: done in {format_duration(clock() - started)}", file=stream, flush=True)


class PlainTasks:
    """The part of rich's ``Progress`` that multi-task code uses (``add_task``/``advance``/``update``),
    printing each task as :class:`Progress` plain lines; for when stdout is not a terminal."""

    def __init__(self, every: float | None = None, stream=None, clock=time.monotonic):
        self.every, self.stream, self.clock = every, stream, clock
        self.tasks: dict[int, Progress] = {}

    def add_task(self, description: str, total=None, unit: str = "item", **_) -> int:
        task_id = len(self.tasks)
        total = int(total) if total else None
        self.tasks[task_id] = Progress(description, total, unit=unit, every=self.every, terminal=False,
                                       stream=self.stream, clock=self.clock)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.tasks[task_id].advance(int(advance))

    def update(self, task_id: int, *, total=None, completed=None, advance=None, **_) -> None:
        task = self.tasks[task_id]
        done = task.done + int(advance) if advance is not None else completed
        task.update(done=None if done is None else int(done), total=None if total is None else int(total) or None)

    def __enter__(self) -> PlainTasks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            for task in self.tasks.values():
                task.close()


def task_progress(rich_progress_factory, show: bool = True):
    """``rich_progress_factory()`` (a rich ``Progress``) on a terminal; :class:`PlainTasks` when stdout is
    not one (and ``show``); a disabled rich ``Progress`` when not ``show``."""
    if show and not is_terminal():
        return PlainTasks()
    return rich_progress_factory()
