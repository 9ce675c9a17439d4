"""Algorithms by name (``stepsearch.ppo.registry``): what is registered, resolution once into an
``Algorithm`` (group size, critic, reward override), one error line for an unknown name, a new
estimator is one decorated function, the shapes every estimator returns, and no ``algorithm ==``
branching left outside the registry."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_fixtures import plain_collectives, synthetic_batch

from stepsearch.errors import StepSearchError
from stepsearch.ppo import registry
from stepsearch.ppo.algorithms import ALGORITHMS, resolve_algorithm
from stepsearch.rewards import RewardConfig
from stepsearch.training.iteration import compute_advantages
from stepsearch.training.module import PPOSettings

SRC = Path(__file__).resolve().parents[2] / "src" / "stepsearch"


def test_the_registered_names():
    assert {"steppo", "ppo", "grpo", "reinforce_plus_plus"} <= set(ALGORITHMS)
    assert {"gae", "grpo", "reinforce_plus_plus"} <= set(registry.ADV_ESTIMATORS)
    assert "vanilla" in registry.POLICY_LOSSES


def test_resolution_reads_the_settings_once():
    steppo = resolve_algorithm(PPOSettings())
    assert (steppo.name, steppo.critic, steppo.kl_in_reward, steppo.kl_loss, steppo.group_size) == \
        ("steppo", True, True, False, 1)
    grpo = resolve_algorithm(PPOSettings(algorithm="grpo", grpo_group_size=4))
    assert (grpo.critic, grpo.kl_in_reward, grpo.kl_loss, grpo.group_size) == (False, False, True, 4)
    assert grpo.estimator is registry.ADV_ESTIMATORS["grpo"] and grpo.loss is registry.POLICY_LOSSES["vanilla"]
    rpp = resolve_algorithm(PPOSettings(algorithm="reinforce_plus_plus", grpo_group_size=4))
    assert (rpp.critic, rpp.kl_in_reward, rpp.kl_loss, rpp.group_size) == (False, True, False, 1)
    # The Search-R1 baseline's reward override is part of its definition; the others keep the config.
    config = RewardConfig()
    only_global = resolve_algorithm(PPOSettings(algorithm="ppo")).rewards(config)
    assert not (only_global.step_rewards or only_global.search_key_reward)
    assert resolve_algorithm(PPOSettings(algorithm="reinforce_plus_plus")).rewards(config) is config


def test_unknown_algorithm_is_one_line_naming_the_field():
    with pytest.raises(StepSearchError, match=r"^model.ppo.algorithm must be one of .*reinforce_plus_plus.*got 'dapo'$"):
        resolve_algorithm(PPOSettings(algorithm="dapo"))


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_adv_est("gae")(lambda *a, **k: None)


def test_a_new_estimator_is_one_decorated_function():
    @registry.register_adv_est("test_constant")
    def constant(token_rewards, values, policy_mask, response_mask, group_ids, *, cfg, comm):
        return policy_mask.float() * 2.0, torch.zeros_like(token_rewards)

    spec = registry.AlgorithmSpec("test_constant", adv_estimator="test_constant", critic=False)
    try:
        registry.register_algorithm(spec)
        cfg = PPOSettings(algorithm="test_constant")
        batch = synthetic_batch(4, 12, 50, seed=0)
        batch.old_logp = batch.ref_logp = batch.old_values = torch.zeros(batch.policy_mask.shape)
        compute_advantages(batch, cfg, 0.1, plain_collectives(), resolve_algorithm(cfg))
        assert torch.equal(batch.advantages, batch.policy_mask.float() * 2.0)
    finally:
        registry.ADV_ESTIMATORS.pop("test_constant")
        registry.ALGORITHMS.pop("test_constant", None)


@pytest.mark.parametrize("name", ["steppo", "ppo", "grpo", "reinforce_plus_plus"])
def test_every_estimator_returns_row_by_token_tensors_zero_off_the_mask(name):
    batch = synthetic_batch(6, 14, 50, seed=1, group_size=2)
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(batch.policy_mask.shape, generator=generator) * batch.policy_mask
    algorithm = resolve_algorithm(PPOSettings(algorithm=name, grpo_group_size=2))
    comm = SimpleNamespace(reduce_sum=lambda t: t.clone(), gather=lambda t: t, rank=0)
    advantages, returns = algorithm.estimator(batch.token_scores, values, batch.policy_mask, batch.response_mask,
                                              batch.group_ids, cfg=PPOSettings(algorithm=name), comm=comm)
    assert advantages.shape == returns.shape == batch.policy_mask.shape
    assert torch.isfinite(advantages).all() and advantages[~batch.policy_mask].abs().max() == 0
    assert advantages[batch.policy_mask].abs().max() > 0


def test_no_algorithm_name_branching_outside_the_registry():
    """``grep -rn 'algorithm ==' src/`` (and ``!=``, ``in (``) finds nothing outside ``stepsearch/ppo``."""
    pattern = re.compile(r"algorithm\s*(==|!=|not in|in\s*[(\[{])")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
             for path in SRC.rglob("*.py") if "ppo" not in path.relative_to(SRC).parts[:1]
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
