"""Settings that each validate alone but cannot run together, refused when the module is built (one
line each, naming the field to change) instead of at the first step or silently ignored.

- ``model.rewards.similarity: dense``: training passes no embedder to the reward (the released reward
  is TF-IDF; a dense one would need its own encoder setting and a device beside the policy and vLLM),
  so the first step would raise in ``rewards.scoring``. ``score_trajectories(..., embed=)`` keeps it
  for offline scoring (docs/decisions.md).
- ``model.ppo.tis_cap`` with ``model.rollout.top_p < 1``: the engines report full-softmax log-probs, a
  nucleus samples from another distribution, so the weights would be biased; ``tis_cap < 1``.
- ``model.ppo.adaptive_kl`` with an algorithm that puts the KL in the loss (``grpo``): the controller's β
  only enters KL-in-reward algorithms, so it would adapt nothing.
- unknown ``model.ppo.loss_agg`` / ``model.ppo.kl_estimator`` (they would raise at the first step).
"""

from __future__ import annotations

from stepsearch.errors import StepSearchError
from stepsearch.ppo import core
from stepsearch.ppo.registry import Algorithm


def refuse_combinations(algorithm: Algorithm, ppo, rollout, rewards) -> None:
    """Raise :class:`StepSearchError` (one line) for the first combination of settings that cannot run."""
    problems = [
        (rewards.similarity == "dense",
         "model.rewards.similarity: dense is not wired into training (no embedder reaches the reward, the "
         "first step would fail); use tfidf, the released reward"),
        (ppo.loss_agg not in core.LOSS_AGGREGATIONS,
         f"model.ppo.loss_agg must be one of {', '.join(core.LOSS_AGGREGATIONS)}, got {ppo.loss_agg!r}"),
        (ppo.kl_estimator not in core._KL_ALIASES,
         f"model.ppo.kl_estimator must be one of {', '.join(sorted(core._KL_ALIASES))}, got {ppo.kl_estimator!r}"),
        (ppo.tis_cap is not None and ppo.tis_cap < 1, f"model.ppo.tis_cap must be >= 1 (or null: off), got {ppo.tis_cap}"),
        (ppo.tis_cap is not None and rollout.top_p != 1,
         f"model.ppo.tis_cap needs model.rollout.top_p = 1 (got {rollout.top_p}): with a nucleus, the engine's "
         "log-probs are not the trainer's full-softmax ones and the weights would be biased"),
        (ppo.adaptive_kl and not algorithm.kl_in_reward,
         f"model.ppo.adaptive_kl adapts the β of the KL in the reward, but {algorithm.name} puts the KL in the loss "
         "(model.ppo.kl_coef); set adaptive_kl: false"),
    ]
    for bad, message in problems:
        if bad:
            raise StepSearchError(message)
