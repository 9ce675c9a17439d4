"""Rollout sampling seeded per question and iteration, never per batch position or rank.

A trajectory's random draws come from a seed derived from (the generate call's seed, the row's key),
where the caller's key names the question (training: the example's id and text, plus the sample's
index within its GRPO group) and the call's seed names the run and PPO iteration
(:func:`iteration_seed`). So a question samples the same tokens whichever rank holds it and
whichever other questions share its batch: a fit on 1 process × B prompts and on N processes × B/N
prompts generates the same trajectories (``tests/test_module.py``).

- Hugging Face engine: :class:`RowStreams`, one ``torch.Generator`` per row on the CPU, drawn in
  blocks, consumed only by that row's sampling steps (nucleus rejection rounds included);
- vLLM engine: the request seed of a row's turn ``t`` is :func:`turn_seed` (row seed, t).

Keys are hashed with BLAKE2b (stable across processes and Python runs, unlike ``hash``).
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 64  # uniforms drawn per row at a time


def stable_seed(*parts) -> int:
    """A 64-bit seed from ``parts`` (their ``str``), the same in every process and Python run."""
    text = "\x1f".join(str(part) for part in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def iteration_seed(seed: int, iteration: int) -> int:
    """The generate seed of PPO iteration ``iteration`` of a run seeded ``seed`` (no collisions
    between (seed, iteration) pairs, as ``seed + 1000·iteration`` would have)."""
    return stable_seed("iteration", seed, iteration) % (2**63 - 1)


def row_seed(seed: int, key) -> int:
    """A row's sampling seed: a function of the generate seed and the row's key only."""
    return stable_seed("row", seed, key) % (2**63 - 1)


def turn_seed(row: int, turn: int) -> int:
    """The vLLM request seed of a row's turn (vLLM takes a 31-bit seed)."""
    return stable_seed("turn", row, turn) % (2**31 - 1)


def example_row_keys(examples, samples_per_example: int = 1) -> list[str]:
    """Row keys of a rollout batch of ``examples``, each repeated ``samples_per_example`` times in a
    row (GRPO groups): the example's id and question, and the sample's index within its group."""
    return [f"{ex.id}\x1f{ex.question}\x1f{k}" for ex in examples for k in range(samples_per_example)]


class RowStreams:
    """Independent uniform streams in [0, 1), one per row of a generate call."""

    def __init__(self, seeds: list[int], device):
        self.device = device
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.buffer = torch.empty(len(seeds), BLOCK, dtype=torch.float32)
        self.cursor = torch.zeros(len(seeds), dtype=torch.long)
        for row in range(len(seeds)):
            self._refill(row)

    def _refill(self, row: int) -> None:
        self.buffer[row] = torch.rand(BLOCK, generator=self.generators[row])
        self.cursor[row] = 0

    def draw(self, rows: torch.Tensor) -> torch.Tensor:
        """The next uniform of each of ``rows`` (distinct row numbers, a CPU long tensor), on the device."""
        values = self.buffer[rows, self.cursor[rows]]
        self.cursor[rows] += 1
        for row in rows[self.cursor[rows] >= BLOCK].tolist():
            self._refill(row)
        return values.to(self.device, non_blocking=True)
