"""Plain progress lines when stdout is not a terminal (stepsearch.progress)."""

from __future__ import annotations

import io
import re

import pytest

from stepsearch import progress
from stepsearch.errors import ConfigError


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_n_seconds_with_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    with progress.Progress("warm-start", 100, unit="step", every=30, terminal=False, stream=out, clock=clock) as bar:
        for _ in range(100):
            clock.now += 2.0  # 0.5 steps/s
            bar.advance(1, loss=0.5)
    lines = out.getvalue().splitlines()
    # start, then one line per 30 s of 200 s (at 30, 60, ..., 180 s: 6 lines), then the final line
    assert len(lines) == 1 + 6 + 1, lines
    assert lines[0] == "warm-start: 0/100 steps (0%)"
    assert lines[1] == "warm-start: 15/100 steps (15%), 2.0 s/step, ETA 2m50s, loss 0.500"
    assert lines[-1] == "warm-start: 100/100 steps (100%), 2.0 s/step, done in 3m20s, loss 0.500"


def test_rate_per_second_and_resumed_count():
    out, clock = io.StringIO(), FakeClock()
    bar = progress.Progress("PPO", 50, unit="iteration", every=0, terminal=False, start=20, stream=out, clock=clock)
    clock.now += 4.0
    bar.update(done=30)  # 10 iterations in 4 s made by this process (not 30)
    assert out.getvalue().splitlines()[-1] == "PPO: 30/50 iterations (60%), 2.5 iterations/s, ETA 8s"


def test_plain_tasks_speak_richs_task_api():
    out, clock = io.StringIO(), FakeClock()
    with progress.PlainTasks(every=0, stream=out, clock=clock) as tasks:
        read = tasks.add_task("reading corpus.jsonl", total=2048)
        clock.now += 1.0
        tasks.advance(read, 1024)
        encode = tasks.add_task("encoding passages", total=0)
        tasks.update(encode, total=10)
        tasks.update(encode, advance=10)
    text = out.getvalue()
    assert "reading corpus.jsonl: 1024/2048 items (50%), 1024.0 items/s, ETA 1s" in text
    assert "encoding passages: 10/10 items (100%)" in text


def test_every_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.EVERY_ENV, "5")
    assert progress.default_every() == 5.0
    monkeypatch.setenv(progress.EVERY_ENV, "soon")
    with pytest.raises(ConfigError, match="STEPSEARCH_PROGRESS_EVERY"):
        progress.default_every()


def test_step_prints_start_and_time_taken():
    out, clock = io.StringIO(), FakeClock()
    with progress.step("world: writing data/world", stream=out, clock=clock):
        clock.now += 75
    assert out.getvalue().splitlines() == ["world: writing data/world ...", "world: writing data/world: done in 1m15s"]


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (185, "3m05s"), (7620, "2h07m"), (float("nan"), "?")])
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text


def test_terminal_draws_a_bar_not_lines():
    out = io.StringIO()
    with progress.Progress("warm-start", 3, unit="step", terminal=True, stream=out) as bar:
        bar.advance(3)
    assert not re.search(r"warm-start: \d+/3 steps", out.getvalue())
    assert "3/3" in out.getvalue()
