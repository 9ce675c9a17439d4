"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262; veRL's ``reinforce_plus_plus`` estimator): critic-free
PPO whose advantages are the discounted returns of the token rewards (placed scores − β·KL per token),
whitened over the GLOBAL batch.

Why this one (of DAPO, GSPO, REINFORCE++), for a step-reward search agent:

- it keeps StePPO's point. The information-gain and redundancy rewards are placed at each
  ``</search>`` (METHOD.md §2); a return ``G_k = Σ_l γ^l r_{k+l}`` over policy tokens still credits
  each search step with its own reward and what follows it, so turning the step rewards on or off
  changes the update (the ablations stay meaningful). GRPO and GSPO sum a trajectory into one score,
  so a step reward only moves that sum; DAPO builds on GRPO's sequence score too.
- it drops the critic: no value scoring, no critic update (half the actor-critic compute and, with
  ``model.critic: shared``, no second model) — the run-time question the paper's PPO raises.
- it fits the update's invariances as is: the estimator is token-wise plus one global whitening
  through ``comm.reduce_sum``, so micro-batch size and rank count still do not change the update.
  DAPO's dynamic sampling drops whole groups, so the rows per iteration (and per rank) vary and
  must be refilled by over-sampling rollouts, which breaks the fixed global batch that the sampler,
  resume and rank-invariance tests rely on; GSPO needs groups as GRPO does.

Definition here: token rewards ``r_k = placed_k − β·KL_k`` on policy tokens (β: ``ppo.kl_coef``, the KL
controller's, as StePPO's; ``ppo.kl_estimator``, k1 by default), returns ``G_k`` over policy tokens
only, environment tokens skipped as in our GAE (``ppo.released_gae``: over every response token),
discount ``ppo.gamma``; advantages ``(G − mean)/sqrt(var + 1e-8)`` over every policy token of the
global batch (``ppo.whiten_advantages``); the clipped PPO loss (``vanilla``). As veRL, the returns
are computed with ``λ = 1`` whatever ``ppo.lam`` says (there is no value to bootstrap from).
"""

from __future__ import annotations

import torch

import stepsearch.ppo.core as core
from stepsearch.ppo.algorithms.builtin import value_mask
from stepsearch.ppo.registry import AlgorithmSpec, register_adv_est, register_algorithm

Tensor = torch.Tensor


@register_adv_est("reinforce_plus_plus")
def reinforce_plus_plus_advantages(token_rewards: Tensor, values: Tensor, policy_mask: Tensor,
                                   response_mask: Tensor, group_ids: Tensor, *, cfg, comm) -> tuple[Tensor, Tensor]:
    """([B, W] globally whitened discounted returns, [B, W] returns); ``values`` and ``group_ids`` unused."""
    # GAE with zero values and λ = 1 is the discounted return: δ_k = r_k, A_k = Σ_l γ^l r_{k+l}.
    returns, _ = core.compute_gae(token_rewards, torch.zeros_like(token_rewards), policy_mask, gamma=cfg.gamma,
                                  lam=1.0, skip_masked=not cfg.released_gae, response_mask=response_mask)
    advantages = returns
    if cfg.whiten_advantages:
        advantages = core.masked_whiten(returns, value_mask(policy_mask, response_mask, cfg.released_gae),
                                        reduce_sum=comm.reduce_sum)
    return advantages, returns


REINFORCE_PLUS_PLUS = register_algorithm(AlgorithmSpec(
    "reinforce_plus_plus", adv_estimator="reinforce_plus_plus", critic=False,
    summary="REINFORCE++: critic-free, discounted returns of placed − β·KL whitened over the global batch"))
