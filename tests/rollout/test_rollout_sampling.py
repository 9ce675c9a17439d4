"""Token sampling: greedy, full-distribution and nucleus (top-p) draws against hand-computed targets."""

from __future__ import annotations

import math

import pytest
import torch

from stepsearch.rollout.decoding import sample_next

PROBS = [0.5, 0.3, 0.15, 0.05]  # row 0; row 1 is the reverse order
DRAWS = 20000


def _frequencies(top_p: float, temperature: float = 1.0) -> torch.Tensor:
    logits = torch.log(torch.tensor([PROBS, PROBS[::-1]], dtype=torch.float32))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 4, dtype=torch.float64)
    for _ in range(DRAWS // 100):
        batch = logits.repeat_interleave(100, dim=0)
        tokens = sample_next(batch, False, temperature, top_p, generator).view(2, 100)
        for row in range(2):
            counts[row] += torch.bincount(tokens[row], minlength=4).double()
    return counts / DRAWS


def _expected(top_p: float, temperature: float = 1.0) -> list[list[float]]:
    rows = []
    for probs in (PROBS, PROBS[::-1]):
        scaled = [p ** (1 / temperature) for p in probs]
        scaled = [p / sum(scaled) for p in scaled]
        # Nucleus: keep a token when the mass of the tokens ranked above it is below top_p.
        order = sorted(range(4), key=lambda i: -scaled[i])
        kept, mass = set(), 0.0
        for i in order:
            if mass < top_p:
                kept.add(i)
            mass += scaled[i]
        total = sum(scaled[i] for i in kept)
        rows.append([scaled[i] / total if i in kept else 0.0 for i in range(4)])
    return rows


@pytest.mark.parametrize(("top_p", "temperature"), [(1.0, 1.0), (0.9, 1.0), (0.7, 1.0), (0.5, 1.0), (0.9, 0.5)])
def test_sampling_matches_the_nucleus_distribution(top_p, temperature):
    observed = _frequencies(top_p, temperature)
    for row, target in enumerate(_expected(top_p, temperature)):
        for token, p in enumerate(target):
            if p == 0.0:
                assert observed[row, token] == 0.0
            else:  # 5 standard errors
                assert abs(observed[row, token] - p) < 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-9


def test_hand_checked_nucleus_sets():
    # top_p = 0.9: mass above token 2 is 0.8 < 0.9 (kept), above token 3 it is 0.95 (dropped).
    assert _expected(0.9)[0] == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert _expected(0.5)[0] == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_greedy_and_seeded():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, True, 1.0, 0.9, None), logits.argmax(-1))
    draw = lambda seed: sample_next(logits, False, 1.0, 0.9, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert any(not torch.equal(draw(3), draw(s)) for s in range(4, 10))
