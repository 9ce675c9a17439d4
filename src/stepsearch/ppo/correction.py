"""Truncated importance sampling (TIS) between the rollout engine and the trainer.

The rollout engine (vLLM kernels, maybe another precision) samples tokens from π_rollout, while PPO's
ratio is taken against the trainer's recomputed old log-probs π_old of the same tokens: the two differ
a little, so the samples are slightly off-policy. TIS (Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training"; veRL's rollout importance sampling) weights each policy
token's loss by ``w = min(π_old / π_rollout, C)`` (no gradient), truncated at ``C`` =
``model.ppo.tis_cap`` (a trainer setting: the engine only reports its log-probs) to bound the variance.
Off by default (``tis_cap: null``).

Since ``w >= 0`` is a constant per token, ``w · min(r·A, clip(r)·A) = min(r·(w·A), clip(r)·(w·A))``:
weighting the clipped PPO loss is exactly scaling the advantages, so the trainer applies it right
after computing advantages (:func:`apply_truncated_is`). Both engines return
``Trajectory.rollout_logprobs`` with the trainer's definition (``log softmax(logits / T)``), which is
why ``tis_cap`` requires ``rollout.top_p = 1`` (refused at setup otherwise, ``StepSearchPPO``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rollout_ratio(old_logp: Tensor, rollout_logp: Tensor) -> Tensor:
    """``[B, T]`` ``π_old / π_rollout = exp(old − rollout)`` in float32 (exponent clamped at 20: no inf)."""
    return torch.exp((old_logp.float() - rollout_logp.float()).clamp(max=20.0))


def _truncate(ratio: Tensor, mask: Tensor, cap: float) -> Tensor:
    return torch.where(mask.bool(), ratio.clamp(max=cap), torch.ones_like(ratio))


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``[B, T]`` weights ``min(exp(old − rollout), cap)`` on ``mask`` tokens, 1 elsewhere."""
    return _truncate(rollout_ratio(old_logp, rollout_logp), mask, cap)


def apply_truncated_is(batch, reduce_sum=lambda t: t, cap: float | None = None) -> dict[str, float]:
    """Scale ``batch.advantages`` by the TIS weights (``batch.extras["rollout_logp"]`` [B, L-1], aligned
    with ``old_logp``; ``cap``, by default ``batch.extras["tis_cap"]``); returns the global mean weight
    and the share of truncated tokens."""
    cap = batch.extras["tis_cap"] if cap is None else cap
    mask = batch.policy_mask
    rollout_logp = batch.extras["rollout_logp"].to(batch.old_logp.device)
    ratio = rollout_ratio(batch.old_logp, rollout_logp)
    weights = _truncate(ratio, mask, cap)
    batch.advantages = batch.advantages * weights
    sums = reduce_sum(torch.stack([(weights * mask).sum(), ((ratio > cap) & mask.bool()).sum(),
                                   mask.sum()]).float())
    count = sums[2].clamp_min(1)
    return {"tis_weight_mean": float(sums[0] / count), "tis_truncated_frac": float(sums[1] / count)}
