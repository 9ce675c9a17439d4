"""Truncated importance sampling against a float64 reference written here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from stepsearch.ppo.correction import apply_truncated_is, truncated_is_weights


def test_weights_are_the_truncated_ratio_on_policy_tokens():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 0, 1]])
    got = truncated_is_weights(old, rollout, mask, cap=2.0)
    expected = [min(math.exp(-1.0 + 1.5), 2.0), min(math.exp(-2.0 + 1.0), 2.0), 1.0, 2.0]
    assert torch.allclose(got.double(), torch.tensor([expected], dtype=torch.float64), atol=1e-6)


def test_advantages_scaled_and_stats():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(3, 5, generator=generator).double() - 2
    rollout = old + 0.3 * torch.randn(3, 5, generator=generator).double()
    mask = torch.rand(3, 5, generator=generator) > 0.3
    advantages = torch.randn(3, 5, generator=generator)
    batch = SimpleNamespace(old_logp=old.float(), policy_mask=mask, advantages=advantages.clone(),
                            extras={"rollout_logp": rollout.float(), "tis_cap": 1.2})
    stats = apply_truncated_is(batch)
    ratio = torch.exp(old - rollout)
    weights = torch.where(mask, ratio.clamp(max=1.2), torch.ones_like(ratio))
    assert torch.allclose(batch.advantages.double(), advantages.double() * weights, atol=1e-5)
    assert math.isclose(stats["tis_weight_mean"], float(weights[mask].mean()), rel_tol=1e-5)
    assert math.isclose(stats["tis_truncated_frac"], float((ratio[mask] > 1.2).double().mean()), rel_tol=1e-6)
