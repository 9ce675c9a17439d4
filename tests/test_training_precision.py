"""Precision that learns: at the recipes' learning rate and precision (float32 master weights, bf16
compute), more than 90% of the actor's weights move in 10 optimizer steps; the pure-bf16-weights
variant does not (and is refused in one line)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import yaml
from training_fixtures import REPO, _one_thread, plain_collectives, synthetic_batch, tiny_model_dir  # noqa: F401

from stepsearch.errors import StepSearchError
from stepsearch.models.policy import ActorCritic, PolicySettings
from stepsearch.training.module import OptimSettings, PPOSettings
from stepsearch.training.iteration import actor_update, compute_advantages, minibatch_schedule, score_rollouts

RECIPES = ["configs/stepsearch_qwen2.5_3b.yaml", "experiments/stepsearch_qwen2.5_7b.yaml"]


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _recipe(path):
    """The recipe as LightningCLI merges it (the 7B file is an overlay on the 3B recipe)."""
    config = yaml.safe_load((REPO / RECIPES[0]).read_text())
    if path != RECIPES[0]:
        config = _merge(config, yaml.safe_load((REPO / path).read_text()))
    trainer = yaml.safe_load((REPO / "configs/trainer/fsdp.yaml").read_text())
    return config, trainer


def _moved_fraction(tiny, dtype: str, lr: float, autocast: bool) -> float:
    ac = ActorCritic(PolicySettings(name_or_path=str(tiny), dtype=dtype, critic="shared"), seed=0)
    batch = synthetic_batch(10, 20, ac.policy.config.vocab_size, seed=4)
    cfg = PPOSettings(ppo_epochs=1, mini_batch_size=1, micro_batch_size=1)
    params = ac.actor_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        score_rollouts(ac, batch, 4, need_values=True)
        compute_advantages(batch, cfg, 0.001, plain_collectives())
        actor_update(ac, batch, minibatch_schedule(len(batch), 1, 1, torch.Generator().manual_seed(0)), cfg,
                     optimizer, params, plain_collectives())
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    return moved / sum(b.numel() for b in before)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_precision_moves_the_weights(tiny_dir, recipe):
    config, trainer = _recipe(recipe)
    model, optim = config["model"]["model"], config["model"]["optim"]
    assert trainer["strategy"]["class_path"].endswith("FSDP2Strategy")
    assert "fsdp.yaml" in (REPO / recipe).read_text()  # the recipe launches with the FSDP2 preset
    fraction = _moved_fraction(tiny_dir, model.get("dtype", "float32"), float(optim["actor_lr"]), autocast=True)
    assert fraction > 0.9, f"only {fraction:.1%} of actor weights moved in 10 steps"


def test_pure_bf16_weights_at_the_recipe_lr_barely_move_and_are_refused(tiny_dir):
    assert _moved_fraction(tiny_dir, "bfloat16", 5e-7, autocast=False) < 0.1
    from stepsearch.training.sharding import check_strategy_and_sizes

    trainer = SimpleNamespace(strategy=object(), datamodule=None, world_size=1, global_rank=0)
    module = SimpleNamespace(trainer=trainer, _trainer=trainer, model_settings=PolicySettings(dtype="bf16"),
                             optim=OptimSettings(actor_lr=5e-7), ppo=PPOSettings())
    with pytest.raises(StepSearchError, match=r"model.model.dtype=bf16 .* < 1e-5"):
        check_strategy_and_sizes(module, "fit")
    allowed = copy.copy(module)
    allowed.optim = OptimSettings(actor_lr=5e-7, optimizer="torch.optim.SGD")  # a deliberate choice passes
    assert check_strategy_and_sizes(allowed, "fit")["mini_batch_size"] == 32


def test_global_sizes_that_do_not_divide_fail_in_one_line():
    from stepsearch.training.sharding import check_strategy_and_sizes

    trainer = SimpleNamespace(strategy=object(), datamodule=SimpleNamespace(batch_size=12), world_size=8, global_rank=0)
    module = SimpleNamespace(trainer=trainer, _trainer=trainer, model_settings=PolicySettings(), optim=OptimSettings(),
                             ppo=PPOSettings(mini_batch_size=32))
    with pytest.raises(StepSearchError, match=r"^data.batch_size=12 must be divisible by the number of ranks \(8\)"):
        check_strategy_and_sizes(module, "fit")
    trainer.datamodule.batch_size = 128
    assert check_strategy_and_sizes(module, "fit") == {"batch_size": 16, "mini_batch_size": 4}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.getbasetemp())
