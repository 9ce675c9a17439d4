"""``fit`` with its output in a log file (as on a cluster): the bootstrap steps and the PPO iterations
print plain progress lines with counts, rates and ETAs, and the bar never says ``Epoch 0/-2``."""

from __future__ import annotations

import re

from cli_runs import fit_args, kill_started_processes, start_cli  # noqa: F401  (fixture)
from training_fixtures import REPO


def test_fit_into_a_log_file_shows_every_long_step(tmp_path):
    log = tmp_path / "fit.log"
    # The progress bar left on (the default): stdout is a file, so the plain lines stand in for it.
    args = [a for a in fit_args(tmp_path, "--seed", "0", "--trainer.max_steps", "3")]
    at = args.index("--trainer.enable_progress_bar")
    del args[at:at + 2]
    proc = start_cli(args, REPO, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    lines = text.splitlines()

    assert "Epoch 0/-2" not in text and "Epoch " not in text
    assert any(re.fullmatch(r"world: generating seed 0 into .*/seed0/world: done in \d+s", line) for line in lines)
    assert any(re.fullmatch(r"tiny model: training its tokenizer and writing .*/tiny: done in \d+s", line)
               for line in lines)
    planned = int(re.search(r"^warm-start: collecting (\d+) demonstrations", text, re.M).group(1))
    assert planned > 0
    assert f"warm-start: collecting: 0/{planned} demonstrations (0%)" in lines
    collected = [line for line in lines if line.startswith(f"warm-start: collecting: {planned}/{planned} ")]
    assert len(collected) == 1 and re.search(r"demonstrations/s, done in \d+s$", collected[0]), text[-3000:]
    trained = [line for line in lines if re.match(r"warm-start: training: (\d+)/\1 steps \(100%\), .*done in", line)]
    assert len(trained) == 1 and re.search(r"epoch 1/1, loss \d+\.\d{3}$", trained[0]), text[-3000:]
    # One line per PPO iteration with the rate, an ETA until the last, and the reward.
    ppo = [line for line in lines if line.startswith("PPO: ")]
    assert ppo[0] == "PPO: 0/3 iterations (0%)"
    for k in (1, 2):
        line = next(line for line in ppo if line.startswith(f"PPO: {k}/3 iterations ({100 * k / 3:.0f}%), "))
        assert re.search(r", \d+\.\d (s/iteration|iterations/s), ETA \d+(s|m\d\ds), train/reward -?\d", line), line
    assert len(ppo) == 4, ppo
    assert re.match(r"PPO: 3/3 iterations \(100%\), \d+\.\d (s/iteration|iterations/s), done in \d+", ppo[-1])
    assert re.search(r"reading corpus.jsonl: (\d+)/\1 bytes \(100%\), .* done in \d+s", text)  # the index build
