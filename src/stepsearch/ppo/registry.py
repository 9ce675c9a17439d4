"""Algorithms by name: advantage estimators, policy losses, and the named combinations of them.

As veRL's ``core_algos.py``: an advantage estimator or a policy loss is one function registered under a
name (:func:`register_adv_est`, :func:`register_policy_loss`), and an *algorithm* (:class:`AlgorithmSpec`,
:func:`register_algorithm`) names one combination: which estimator, which policy loss, whether β·KL goes
into the token rewards (the KL controller's β) or into the loss, whether a critic is scored and trained,
how many samples per prompt, and how it changes the configured rewards. ``ppo.algorithm`` is resolved
ONCE, when the module is built (:func:`resolve_algorithm`), into an :class:`Algorithm` that the
module, ``training.iteration`` and ``training.sharding`` read; nothing else compares algorithm names.

Shapes (``[B, W]``: a rank's rows × token columns, as in ``training.iteration``):

- estimator ``(token_rewards [B, W] float, values [B, W] float, policy_mask [B, W] bool,
  response_mask [B, W] bool, group_ids [B] long, *, cfg, comm) -> (advantages [B, W], returns [B, W])``:
  ``token_rewards`` are the placed scores (minus β·KL on policy tokens where the algorithm puts the KL
  in the reward); ``values`` the old critic values (zeros without a critic); ``group_ids`` global
  prompt ids; ``cfg`` the ``PPOSettings``; ``comm`` sums over ranks (``reduce_sum``), concatenates over
  ranks (``gather``) and knows ``rank`` — anything global (whitening, groups) goes through it.
- policy loss ``(logp [B, W], old_logp [B, W], advantages [B, W], mask [B, W] bool, *, cfg, loss_agg: str,
  denominator: scalar tensor | None) -> (loss scalar, stats dict of detached scalars: clip_frac, approx_kl,
  ratio)``: ``loss_agg`` is a mode of ``core.LOSS_AGGREGATIONS`` and ``denominator`` what it divides by
  over the whole minibatch on all ranks (``core.aggregation_count``).

Adding an algorithm is one file under ``stepsearch/ppo/algorithms/`` (its estimator and/or loss, if new,
and one :func:`register_algorithm` call), one import line in ``ppo/algorithms/__init__.py``, and a
config (docs/training.md "Algorithms").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from stepsearch.errors import StepSearchError

Tensor = torch.Tensor


class Reductions(Protocol):
    """What an estimator may ask of the strategy (``training.iteration.Collectives`` provides it)."""

    reduce_sum: Callable[[Tensor], Tensor]
    gather: Callable[[Tensor], Tensor]
    rank: int


AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]

ADV_ESTIMATORS: dict[str, AdvantageEstimator] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}
ALGORITHMS: dict[str, "AlgorithmSpec"] = {}


def _register(table: dict, kind: str, name: str):
    def decorate(fn):
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = fn
        return fn

    return decorate


def register_adv_est(name: str):
    """Decorator: register an advantage estimator under ``name`` (signature: module doc)."""
    return _register(ADV_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str):
    """Decorator: register a policy loss under ``name`` (signature: module doc)."""
    return _register(POLICY_LOSSES, "policy loss", name)


def get_adv_estimator(name: str) -> AdvantageEstimator:
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ADV_ESTIMATORS))}")
    return ADV_ESTIMATORS[name]


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


@dataclass(frozen=True)
class AlgorithmSpec:
    """A named combination (what :func:`register_algorithm` stores).

    Args:
        name: ``ppo.algorithm``.
        adv_estimator: a registered estimator name.
        policy_loss: a registered policy-loss name.
        critic: old values are scored, GAE-style estimators read them, the critic is trained (separate
            optimizer, or the shared head's value loss); without it the critic sits idle.
        kl_in_reward: token rewards are placed − β·KL (β from the KL controller); otherwise the
            placed scores as they are.
        kl_loss: add ``ppo.kl_coef`` × the k3 KL(π‖π_ref) to the actor loss (GRPO).
        grouped: ``ppo.grpo_group_size`` samples per prompt (1 otherwise).
        rewards: how the algorithm changes the configured ``RewardConfig`` (``ppo``: global reward only).
        summary: one line for the docs and errors.
    """

    name: str
    adv_estimator: str
    policy_loss: str = "vanilla"
    critic: bool = True
    kl_in_reward: bool = True
    kl_loss: bool = False
    grouped: bool = False
    rewards: Callable | None = None
    summary: str = ""


@dataclass(frozen=True)
class Algorithm:
    """An algorithm resolved for one run's ``PPOSettings``: the spec plus its functions and group size."""

    spec: AlgorithmSpec
    estimator: AdvantageEstimator
    loss: PolicyLoss
    group_size: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def critic(self) -> bool:
        return self.spec.critic

    @property
    def kl_in_reward(self) -> bool:
        return self.spec.kl_in_reward

    @property
    def kl_loss(self) -> bool:
        return self.spec.kl_loss

    def rewards(self, config):
        """The reward config this algorithm trains with (``config`` unchanged unless it overrides)."""
        return config if self.spec.rewards is None else self.spec.rewards(config)


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Register ``spec`` under ``spec.name`` (its estimator and loss must be registered already)."""
    get_adv_estimator(spec.adv_estimator)
    get_policy_loss(spec.policy_loss)
    _register(ALGORITHMS, "algorithm", spec.name)(spec)
    return spec


def resolve_algorithm(cfg) -> Algorithm:
    """``cfg.algorithm`` (a ``PPOSettings``) as an :class:`Algorithm`; one error line naming the field.

    The built-in algorithms are registered when ``stepsearch.ppo`` is imported (``ppo.algorithms``)."""
    spec = ALGORITHMS.get(cfg.algorithm)
    if spec is None:
        raise StepSearchError(f"model.ppo.algorithm must be one of {', '.join(sorted(ALGORITHMS))}, "
                              f"got {cfg.algorithm!r}")
    group = int(cfg.grpo_group_size) if spec.grouped else 1
    if group < 1:
        raise StepSearchError(f"model.ppo.grpo_group_size must be >= 1, got {cfg.grpo_group_size}")
    return Algorithm(spec, get_adv_estimator(spec.adv_estimator), get_policy_loss(spec.policy_loss), group)
