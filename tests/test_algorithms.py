"""Every registered algorithm through the real module and Trainer (one PPO iteration on the tiny
world): the new one, REINFORCE++, trains the actor and leaves the critic alone; the quickstart
command line runs it by name; and settings that cannot run together are refused when the module is
built, in one line naming the field."""

from __future__ import annotations

import pytest
import torch
from cli_runs import cli_env, fit_args, kill_started_processes, run_cli  # noqa: F401  (fixture)
from training_fixtures import _one_thread, make_datamodule, make_module, rollout_config, training_env  # noqa: F401

from stepsearch.errors import StepSearchError
from stepsearch.rewards import RewardConfig


def _trainer(root):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=1, default_root_dir=root, num_sanity_val_steps=0,
                     log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                     enable_checkpointing=False, limit_val_batches=0)


def test_reinforce_plus_plus_trains_the_actor_and_leaves_the_critic(training_env, tmp_path):
    module = make_module(training_env, ppo={"algorithm": "reinforce_plus_plus", "mini_batch_size": 2,
                                            "micro_batch_size": 2}, log_samples_every_n_steps=0)
    module.configure_model()
    ac = module.actor_critic
    actor = [p.detach().clone() for p in ac.actor_parameters()]
    critic = [p.detach().clone() for p in ac.critic_parameters()]
    trainer = _trainer(tmp_path)
    trainer.fit(module, make_datamodule(training_env, batch_size=2))
    assert trainer.global_step == 1
    assert any(not torch.equal(a, p.detach()) for a, p in zip(actor, ac.actor_parameters()))
    assert all(torch.equal(c, p.detach()) for c, p in zip(critic, ac.critic_parameters()))
    metrics = trainer.callback_metrics
    assert module.reward_config.step_rewards  # the step rewards stay on: returns carry them
    assert "train/policy_loss" in metrics and "train/value_loss" not in metrics and "train/kl_loss" not in metrics


def test_quickstart_command_runs_the_new_algorithm(tmp_path):
    """``fit --config configs/quickstart.yaml --model.ppo.algorithm reinforce_plus_plus``, shrunk (a tiny
    world, model and warm-start made by the bootstrap), for one PPO iteration."""
    args = fit_args(tmp_path, "--model.ppo.algorithm", "reinforce_plus_plus", "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--seed", "0")
    proc = run_cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (tmp_path / "runs").rglob("*.ckpt")] == ["iter-000001.ckpt"]
    assert list((tmp_path / "runs").glob("quickstart-reinforce_plus_plus-seed0"))  # the run named by it


@pytest.mark.parametrize("settings, message", [
    (dict(rewards=RewardConfig(similarity="dense")), r"^model.rewards.similarity: dense is not wired into training"),
    (dict(ppo={"tis_cap": 2.0}, rollout=rollout_config(top_p=0.9)), r"^model.ppo.tis_cap needs model.rollout.top_p = 1"),
    (dict(ppo={"tis_cap": 0.5}), r"^model.ppo.tis_cap must be >= 1"),
    (dict(ppo={"algorithm": "grpo", "adaptive_kl": True}), r"^model.ppo.adaptive_kl adapts .* grpo puts the KL in the loss"),
    (dict(ppo={"loss_agg": "seq-sum"}), r"^model.ppo.loss_agg must be one of token-mean, seq-mean-token-mean"),
    (dict(ppo={"kl_estimator": "k4"}), r"^model.ppo.kl_estimator must be one of"),
])
def test_combinations_that_cannot_run_are_refused_in_one_line(settings, message):
    env = type("Env", (), {"sft_dir": "unused"})  # refused before any model is loaded
    with pytest.raises(StepSearchError, match=message) as caught:
        make_module(env, **settings)
    assert "\n" not in str(caught.value)


def test_tis_cap_asks_the_engine_for_its_log_probs():
    env = type("Env", (), {"sft_dir": "unused"})
    assert not make_module(env).rollout_config.return_logprobs
    assert make_module(env, ppo={"tis_cap": 2.0}).rollout_config.return_logprobs
