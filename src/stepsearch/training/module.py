"""``StepSearchPPO``: step-wise PPO (StePPO, METHOD.md §3) as a Lightning module.

One Lightning training step = one PPO iteration, top to bottom:

1. rollout: the policy searches the DataModule's retriever (sampling, METHOD.md §1);
2. rewards: format gate, answer F1, search-key reward at the last token; information gain minus
   redundancy at each ``</search>`` (``stepsearch.rewards``);
3. old log-probs (policy), reference log-probs (frozen initial policy), values (critic);
4. token rewards = placed scores − β·KL(old‖ref), GAE (γ = λ = 1) over policy tokens, whitening
   over the global batch (all ranks);
5. ``ppo_epochs`` × minibatches (micro-batch accumulation) of clipped policy loss − entropy bonus
   and clipped value loss, with manual optimization of two AdamW optimizers (actor, critic); the
   pure parts are in ``stepsearch.training.iteration``, the strategy glue in ``stepsearch.training.sharding``.

Batch sizes are global: ``data.batch_size`` prompts per PPO iteration and ``ppo.mini_batch_size``
prompts per optimizer step, over all ranks; ``ppo.micro_batch_size`` trajectories per forward on one
device. Per-rank numbers are derived in ``setup`` (one error line when they do not divide). Models
are built in ``configure_model`` (FSDP2: sharded there, per decoder layer).

The PPO iteration is our own counter, ``ppo_iterations`` (saved in checkpoints as ``ppo_iteration``):
it seeds the rollouts, names checkpoints (logged as ``step``, which fills ModelCheckpoint's
``{step}``) and is the MLflow step of validation. Lightning's ``global_step`` follows it with public
API only: it counts ``LightningOptimizer.step`` calls, and only an iteration's first optimizer step
goes through one (:meth:`StepSearchPPO.step_optimizer`), so ``max_steps`` and checkpoint cadence count
PPO iterations too; a mismatch stops training with one line (``docs/decisions.md``).
Validation and test: greedy rollouts, EM/F1 (SQuAD normalisation) overall and per dataset; a
validation pass at step 0 (after any warm-start, before the first update) is logged at step 0.

Algorithms (``ppo.algorithm``, registered by name in ``stepsearch.ppo.algorithms``): ``steppo`` (global
+ step rewards as configured), ``ppo`` (global reward only: the Search-R1 baseline; step and key rewards
forced off), ``grpo`` (group-relative advantages over ``grpo_group_size`` samples per prompt, KL as a
loss, no critic update), ``reinforce_plus_plus`` (critic-free, globally whitened discounted returns).
The name is resolved once, here, into ``self.algorithm``; the iteration and the sharding read that.
Settings that cannot run together are refused here too (``training.combinations``), one line each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch

from stepsearch.errors import StepSearchError
from stepsearch.models.policy import ActorCritic, LoraSettings, PolicySettings
from stepsearch.training.validation import EvaluationHooks
from stepsearch.ppo import core
from stepsearch.ppo.algorithms import resolve_algorithm
from stepsearch.records.runs import stop_signal
from stepsearch.rewards import RewardConfig, place_rewards, score_trajectories, summarize_scores
from stepsearch.rollout.engine import RolloutConfig, VLLMSettings
from stepsearch.rollout.seeding import example_row_keys, iteration_seed
from stepsearch.training.combinations import refuse_combinations
from stepsearch.training.sft import BootstrapSettings, TinyModelSettings, WarmStartSettings
from stepsearch.data.continuation import all_rng_states, set_rng_state
from stepsearch.evaluation.loop import EvalAccumulator
from stepsearch.records.tracking import log_policy_dir, log_trajectory_samples, report_before_after
from stepsearch.training.iteration import RolloutBatch, ppo_iteration
from stepsearch.training.sharding import (
    check_strategy_and_sizes,
    clip_or_skip,
    collectives,
    global_means,
    optimizer_class,
    shard_if_model_parallel,
)
from stepsearch.training.bootstrap import run_bootstrap


@dataclass
class PPOSettings:
    """StePPO hyperparameters (METHOD.md §3 defaults).

    Args:
        algorithm: a registered algorithm (``stepsearch.ppo.algorithms``): ``steppo`` | ``ppo`` (global
            reward only, Search-R1) | ``grpo`` | ``reinforce_plus_plus`` (docs/training.md "Algorithms").
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: prompts per optimizer step, over all ranks (GRPO: × ``grpo_group_size`` trajectories).
        micro_batch_size: trajectories per forward/backward on one device (a memory knob: the
            update does not depend on it).
        loss_agg: ``token-mean`` (over the whole minibatch on all ranks) or ``seq-mean-token-mean``.
        clip_eps: policy ratio clip ε.
        value_clip: value clip range around the old values.
        entropy_coef: entropy bonus coefficient.
        value_coef: weight of the value loss when the critic shares the policy trunk.
        gamma: GAE discount. lam: GAE λ.
        kl_coef: β of the KL penalty (in the reward for PPO, in the loss for GRPO).
        kl_estimator: ``k1`` | ``k2`` | ``k3`` | ``abs``.
        adaptive_kl: adapt β toward ``kl_target`` over ``kl_horizon`` tokens (Ziegler et al.).
        whiten_advantages: normalise advantages over policy tokens.
        released_gae: run GAE/whitening/value loss over observation tokens too (released code).
        grpo_group_size: samples per prompt for the grouped algorithms (GRPO).
        tis_cap: truncated importance sampling against the rollout engine's log-probs: each policy
            token's advantage is weighted by ``min(π_old/π_rollout, tis_cap)`` (``stepsearch.ppo.correction``;
            needs ``rollout.top_p: 1``); ``None``: off.
    """

    algorithm: str = "steppo"
    ppo_epochs: int = 1
    mini_batch_size: int = 32
    micro_batch_size: int = 16
    loss_agg: str = "token-mean"
    clip_eps: float = 0.2
    value_clip: float = 0.5
    entropy_coef: float = 0.001
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 1.0
    kl_coef: float = 0.001
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    released_gae: bool = False
    grpo_group_size: int = 5
    tis_cap: float | None = None


@dataclass
class OptimSettings:
    """AdamW for actor and critic with linear warmup (fraction of ``max_steps``) then constant.

    ``optimizer``: import path of the optimizer class (``torch.optim.AdamW``); pure bf16/fp16 weights
    with a learning rate under 1e-5 are refused with the default (its updates fall below half an
    ulp, METHOD.md §3) unless another optimizer (e.g. one with stochastic rounding) is named here.
    ``grad_clip``: global gradient-norm clip (after unscaling); a non-finite norm skips the step.
    """

    actor_lr: float = 5e-7
    critic_lr: float = 5e-7
    actor_warmup_ratio: float = 0.285
    critic_warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    optimizer: str = "torch.optim.AdamW"


# Checkpoints carry these settings as hyperparameters, and resuming loads them with
# ``torch.load(weights_only=True)``, which accepts only allow-listed classes.
torch.serialization.add_safe_globals([PPOSettings, OptimSettings, PolicySettings, LoraSettings, RolloutConfig,
                                      VLLMSettings, RewardConfig, BootstrapSettings, TinyModelSettings,
                                      WarmStartSettings])


class StepSearchPPO(EvaluationHooks, pl.LightningModule):
    """Policy + value heads trained with step-wise PPO on search trajectories.

    Args:
        model: which policy/critic to load (name or path, dtype, critic layout, LoRA).
        rollout: the multi-turn search protocol (turns, token limits, sampling).
        rewards: reward switches and weights (METHOD.md §2).
        ppo: PPO/GRPO hyperparameters.
        optim: optimizers and schedules.
        bootstrap: offline quickstart: make a tiny model and/or warm-start it before PPO.
        log_samples_every_n_steps: log sample trajectories to MLflow every N PPO iterations.
        num_logged_samples: trajectories per sample log.
        seed: base seed of rollout sampling (iteration ``t``, question ``q`` samples from a seed derived
            from ``(seed, t, q)``, whatever rank holds ``q``), of the value heads and the minibatch order.
    """

    def __init__(
        self,
        model: PolicySettings | None = None,
        rollout: RolloutConfig | None = None,
        rewards: RewardConfig | None = None,
        ppo: PPOSettings | None = None,
        optim: OptimSettings | None = None,
        bootstrap: BootstrapSettings | None = None,
        log_samples_every_n_steps: int = 10,
        num_logged_samples: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model_settings = model or PolicySettings()
        self.rollout_config = rollout or RolloutConfig()
        if (ppo or PPOSettings()).tis_cap is not None and not self.rollout_config.return_logprobs:
            self.rollout_config = replace(self.rollout_config, return_logprobs=True)  # TIS reads the engine's
        self.ppo = ppo or PPOSettings()
        self.algorithm = resolve_algorithm(self.ppo)  # the one place the name is read
        rewards = self.algorithm.rewards(rewards or RewardConfig())  # ppo: the global answer reward only
        refuse_combinations(self.algorithm, self.ppo, self.rollout_config, rewards)
        self.reward_config = rewards
        self.optim = optim or OptimSettings()
        self.bootstrap = bootstrap
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.num_logged_samples = num_logged_samples
        self.seed = seed
        self.save_hyperparameters()
        self.actor_critic: ActorCritic | None = None
        self.kl_controller = (
            core.AdaptiveKLController(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
            if self.ppo.adaptive_kl else core.FixedKLController(self.ppo.kl_coef)
        )

        self.val_metrics = EvalAccumulator()
        self.history: dict[str, dict[str, float]] = {}
        self.last_val_step: int | None = None  # the PPO iteration of the latest validation
        self.per_rank = {"batch_size": None,  # set in setup
                         "mini_batch_size": self.ppo.mini_batch_size * self.algorithm.group_size}
        self.skipped_steps = 0
        self.last_grad_norm = float("nan")
        self.ppo_iterations = 0  # PPO iterations done: checkpointed, restored by on_load_checkpoint
        self._iteration_counted = False  # whether this iteration's counted optimizer step was taken

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Quickstart bootstrap on rank 0: make the tiny model, warm-start it (both idempotent)."""
        if self.bootstrap is not None:
            run_bootstrap(self.bootstrap, self.model_settings.name_or_path, self.rollout_config, self.trainer.datamodule)

    def configure_model(self) -> None:
        if self.actor_critic is not None:
            return
        path = self.model_settings.name_or_path
        # A hub id has at most one "/"; anything more path-like that is missing would otherwise
        # surface as a confusing hub error.
        if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
            if not Path(path).expanduser().exists():
                raise StepSearchError(f"model.model.name_or_path: {path} does not exist; point it at a model "
                                      "directory or hub id, or set model.bootstrap to make it")
        self.actor_critic = ActorCritic(self.model_settings, seed=self.seed)

        shard_if_model_parallel(self)

    def setup(self, stage: str) -> None:
        self.per_rank = check_strategy_and_sizes(self, stage)
        self.configure_model()
        # The DataModule owns the environment and its rollout engine (rollout.backend); it generates
        # with this live policy (vLLM: synced after every update, see policy_updated below).
        self.trainer.datamodule.attach_policy(self.actor_critic.generation_model(), self.actor_critic.tokenizer,
                                              self.rollout_config, model_path=self.model_settings.name_or_path)

    def configure_optimizers(self):
        opts, scheds = [], []
        total = max(int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches), 1)
        groups = [(self.actor_critic.actor_parameters(), self.optim.actor_lr, self.optim.actor_warmup_ratio)]
        if not self.actor_critic.shared_critic:
            groups.append((self.actor_critic.critic_parameters(), self.optim.critic_lr, self.optim.critic_warmup_ratio))

        optimizer = optimizer_class(self.optim, self.model_settings)
        for params, lr, warmup_ratio in groups:
            opt = optimizer(params, lr=lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay)
            warmup = max(int(warmup_ratio * total), 0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step, w=warmup: min(1.0, (step + 1) / (w + 1)) if w else 1.0)
            opts.append(opt)
            scheds.append(sched)
        return opts, scheds

    # -------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        iteration = self.ppo_iterations
        group = self.algorithm.group_size
        examples = [ex for ex in batch for _ in range(group)]
        t0 = time.perf_counter()
        # Seeded per question and iteration (rollout.seeding): the rollouts do not depend on the rank
        # a question landed on, nor on the other questions of its batch.
        trajectory = self.trainer.datamodule.rollout(examples, greedy=False, seed=iteration_seed(self.seed, iteration),
                                                     row_keys=example_row_keys(list(batch), group))
        t1 = time.perf_counter()
        scores = score_trajectories(trajectory.records, examples, self.reward_config)
        placed = place_rewards(scores, trajectory, self.reward_config)
        t2 = time.perf_counter()
        stats = self.ppo_update(trajectory.to(self.device), placed.to(self.device), len(batch))
        self.trainer.datamodule.policy_updated()  # the next rollout uses (vLLM: syncs) the updated weights
        t3 = time.perf_counter()

        episode = {**summarize_scores(scores), "response_length": float(trajectory.loss_mask.sum(1).float().mean())}
        metrics = {f"train/{k}": v for k, v in global_means(self, episode, len(examples)).items()}
        metrics.update({f"train/{k}": float(v) for k, v in stats.items()})
        tokens = float(trajectory.timing.get("tokens_generated", 0.0))
        metrics.update({
            "time/rollout_s": t1 - t0,
            "time/retrieval_s": float(trajectory.timing.get("retrieval_s", 0.0)),
            "time/generation_s": float(trajectory.timing.get("generation_s", 0.0)),
            "time/reward_s": t2 - t1,
            "time/update_s": t3 - t2,
            "time/tokens_per_s": tokens / max(t1 - t0, 1e-9),
            "train/kl_coef": float(self.kl_controller.value),
        })
        self.log("train/reward", metrics.pop("train/reward"), prog_bar=True, on_step=True, batch_size=len(examples))
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(examples))
        if self.log_samples_every_n_steps and iteration % self.log_samples_every_n_steps == 0:
            log_trajectory_samples(self.logger, self.actor_critic.tokenizer, trajectory, scores, examples,
                                   f"samples/train_step{iteration:05d}", self.num_logged_samples)
        self._count_one_iteration(iteration)

    def ppo_update(self, trajectory, placed: torch.Tensor, num_prompts: int) -> dict[str, float]:
        """One PPO iteration on this rank's rollouts (``stepsearch.training.iteration``): advantages over the
        global batch, actor and critic updates, the KL controller and schedulers stepped once."""
        comm = collectives(self)
        # Global prompt ids under the sampler's strided layout (local prompt j of rank r is j·W + r).
        prompts = torch.arange(num_prompts, device=self.device) * comm.world_size + comm.rank
        batch = RolloutBatch.from_trajectory(trajectory, placed, prompts.repeat_interleave(self.algorithm.group_size))
        if trajectory.rollout_logprobs is not None:  # for truncated IS (model.ppo.tis_cap, ppo.correction)
            batch.extras["rollout_logp"] = trajectory.rollout_logprobs[:, 1:]
        cfg = replace(self.ppo, mini_batch_size=self.per_rank["mini_batch_size"])
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        ac = self.actor_critic
        generator = torch.Generator().manual_seed(self.seed + self.ppo_iterations)
        stats = ppo_iteration(ac, batch, cfg, optimizers, [ac.actor_parameters(), ac.critic_parameters()], comm,
                              beta=self.kl_controller.value, temperature=max(self.rollout_config.temperature, 1e-6),
                              generator=generator, algorithm=self.algorithm)
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []
        for scheduler in schedulers if self.algorithm.critic else schedulers[:1]:  # critic-free: the critic idles
            scheduler.step()
        self.kl_controller.update(stats["kl"], int(len(batch) * comm.world_size))
        stats["actor_lr"] = float(optimizers[0].param_groups[0]["lr"])
        self.skipped_steps += int(stats.pop("skipped_steps", 0))
        stats["skipped_steps"] = float(self.skipped_steps)
        stats.pop("policy_tokens", None)
        return stats

    def on_before_optimizer_step(self, optimizer) -> None:
        """After AMP unscaling, before the step: clip by global norm; a non-finite norm skips the step."""
        self.last_grad_norm = clip_or_skip(self, optimizer, self.optim.grad_clip)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_coef"] = float(self.kl_controller.value)  # the adaptive β moves; resume it
        checkpoint["skipped_steps"] = int(self.skipped_steps)  # a running count: continues after resume
        # Exact continuation (stepsearch.records.runs): the iteration, every rank's RNG states, and the
        # validation history (the before/after table still compares with step 0 after a resume).
        checkpoint["ppo_iteration"] = int(self.ppo_iterations)
        checkpoint["rng_states"] = all_rng_states(self.trainer)
        checkpoint["val_history"] = {"history": self.history, "last_val_step": self.last_val_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_coef" in checkpoint:
            self.kl_controller.value = float(checkpoint["kl_coef"])
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        # Checkpoints from before the counter carry the same number as Lightning's global_step.
        self.ppo_iterations = int(checkpoint.get("ppo_iteration", checkpoint.get("global_step", 0)))
        if "val_history" in checkpoint:
            self.history = dict(checkpoint["val_history"]["history"])
            self.last_val_step = checkpoint["val_history"]["last_val_step"]
        states = checkpoint.get("rng_states") or []
        if states:
            set_rng_state(states[self.global_rank] if len(states) == self.trainer.world_size else states[0])

    def step_optimizer(self, optimizer) -> None:
        """One optimizer step (clipping and the non-finite check run in ``on_before_optimizer_step``).

        Lightning's ``global_step`` counts ``LightningOptimizer.step`` calls; a PPO iteration takes many
        optimizer steps and is one global step. Its first step goes through the ``LightningOptimizer``
        (counted), the others straight to ``strategy.optimizer_step`` (the same precision plugin and
        hooks, uncounted), so ``global_step`` stays equal to :attr:`ppo_iterations`.
        """
        if self._iteration_counted:
            self.trainer.strategy.optimizer_step(getattr(optimizer, "optimizer", optimizer), lambda: None)
        else:
            optimizer.step()
            self._iteration_counted = True

    def _count_one_iteration(self, before: int) -> None:
        """PPO iteration ``before`` is done: count it; ``step`` (logged, not to the loggers) names its checkpoint."""
        self.ppo_iterations = before + 1
        self._iteration_counted = False
        self.log("step", float(self.ppo_iterations), logger=False, on_step=True, on_epoch=False, batch_size=1)
        if self.trainer.global_step != self.ppo_iterations:
            raise StepSearchError(f"Lightning's global_step is {self.trainer.global_step} after PPO iteration "
                                  f"{self.ppo_iterations}: it no longer counts one per LightningOptimizer.step "
                                  "(StepSearchPPO.step_optimizer); check the installed Lightning version")

    def on_fit_end(self) -> None:
        if stop_signal(self.trainer):
            return  # stopped by a signal: nothing trained to the end to export or report yet
        full_state = self.actor_critic.gather_policy_state()  # FSDP2: a collective, so on every rank
        if self.global_rank != 0:
            return
        out = self.policy_export_dir()
        self.actor_critic.save_policy(out, full_state)

        log_policy_dir(self.logger, out, self.rollout_config)  # + stepsearch_policy.json for evaluate
        if self.history:
            report_before_after(self.history, self.logger)
        print(f"trained policy (Hugging Face format): {out}")

    def policy_export_dir(self) -> Path:
        """``policy/`` beside the run's checkpoint folder (one per run), else under ``default_root_dir``."""
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath).parent / "policy"
        return Path(self.trainer.default_root_dir) / "policy"
