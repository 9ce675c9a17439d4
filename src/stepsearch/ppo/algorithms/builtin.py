"""The paper's algorithms: ``steppo``, ``ppo`` (Search-R1 baseline) and ``grpo``; their estimators
(``gae``, ``grpo``) and policy loss (``vanilla``), registered by name (``stepsearch.ppo.registry``).

- ``steppo``: GAE over policy tokens on placed scores − β·KL, the critic trained, rewards as configured.
- ``ppo``: the same with the global answer reward only (step and search-key rewards forced off:
  ``RewardConfig.global_only``), Search-R1's baseline.
- ``grpo``: ``ppo.grpo_group_size`` samples per prompt, group-normalised sequence scores, β·KL (k3) as a
  loss term with ``ppo.kl_coef``, no critic.
"""

from __future__ import annotations

import torch

import stepsearch.ppo.core as core
from stepsearch.ppo.registry import AlgorithmSpec, register_adv_est, register_algorithm, register_policy_loss

Tensor = torch.Tensor


def value_mask(policy_mask: Tensor, response_mask: Tensor, released_gae: bool) -> Tensor:
    """[B, W] bool: where values, GAE, whitening and the value loss live (policy tokens, or every response
    token with ``released_gae``)."""
    return response_mask if released_gae else policy_mask


@register_adv_est("gae")
def gae_advantages(token_rewards: Tensor, values: Tensor, policy_mask: Tensor, response_mask: Tensor,
                   group_ids: Tensor, *, cfg, comm) -> tuple[Tensor, Tensor]:
    """GAE(γ, λ) over policy tokens (``released_gae``: every response token), whitened over the GLOBAL
    value mask when ``cfg.whiten_advantages``: ([B, W] advantages, [B, W] returns = A + V)."""
    advantages, returns = core.compute_gae(token_rewards, values, policy_mask, gamma=cfg.gamma, lam=cfg.lam,
                                           skip_masked=not cfg.released_gae, response_mask=response_mask)
    if cfg.whiten_advantages:
        advantages = core.masked_whiten(advantages, value_mask(policy_mask, response_mask, cfg.released_gae),
                                        reduce_sum=comm.reduce_sum)
    return advantages, returns


@register_adv_est("grpo")
def grpo_group_advantages(token_rewards: Tensor, values: Tensor, policy_mask: Tensor, response_mask: Tensor,
                          group_ids: Tensor, *, cfg, comm) -> tuple[Tensor, Tensor]:
    """Each row's summed score normalised within its prompt's group, gathered over ranks (groups are
    global prompt ids), on every policy token: ([B, W] advantages, [B, W] zero returns)."""
    local_scores = core.masked_sum(token_rewards, response_mask, dim=1)
    scores, groups = comm.gather(local_scores), comm.gather(group_ids)
    rows = policy_mask.shape[0]
    start = comm.rank * rows  # ranks hold equal row counts (checked at setup)
    advantages = core.grpo_advantages(scores, groups)[start:start + rows][:, None] * policy_mask
    return advantages, torch.zeros_like(advantages)


@register_policy_loss("vanilla")
def vanilla_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, cfg, loss_agg: str,
                        denominator: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate with symmetric ``cfg.clip_eps`` (``core.policy_loss``)."""
    return core.policy_loss(logp, old_logp, advantages, mask, clip_eps=cfg.clip_eps, loss_agg=loss_agg,
                            denominator=denominator)


def _global_only(rewards):
    return rewards.global_only()


STEPPO = register_algorithm(AlgorithmSpec(
    "steppo", adv_estimator="gae", summary="StePPO: global + step rewards, KL in the reward, GAE with a critic"))
PPO = register_algorithm(AlgorithmSpec(
    "ppo", adv_estimator="gae", rewards=_global_only,
    summary="Search-R1 PPO: the global answer reward only (step and key rewards forced off), GAE with a critic"))
GRPO = register_algorithm(AlgorithmSpec(
    "grpo", adv_estimator="grpo", critic=False, kl_in_reward=False, kl_loss=True, grouped=True,
    summary="GRPO: grpo_group_size samples per prompt, group-normalised scores, k3 KL in the loss, no critic"))
