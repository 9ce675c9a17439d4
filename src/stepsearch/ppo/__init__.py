"""PPO core (METHOD.md §3): pure tensor math for StePPO and the GRPO baseline."""

from stepsearch.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "compute_gae",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]
