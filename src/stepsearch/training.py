"""One PPO iteration on a rollout batch: scoring passes, advantages, and the minibatch updates.

Kept apart from ``module.py`` so the Lightning hooks stay short; the math itself lives in
``stepsearch.ppo.core`` (pure tensors). Column ``j`` of every ``[B, L-1]`` tensor here is token
``j + 1`` of the row (see ``models.policy`` for the alignment).
"""

from __future__ import annotations

import contextlib

import torch

from stepsearch.ppo import core


def _trimmed(trajectory, rows: torch.Tensor):
    """Rows of the batch cut to their longest real length (right padding is dead compute)."""
    ids = trajectory.input_ids[rows]
    attn = trajectory.attention_mask[rows]
    length = int(attn.sum(1).max())
    return ids[:, :length], attn[:, :length], length


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


@torch.no_grad()
def score_batch(actor_critic, trajectory, micro_batch_size: int, need_values: bool, temperature: float = 1.0):
    """Old log-probs, reference log-probs and values, micro-batched, as ``[B, L-1]`` tensors.

    Log-probs are those of the sampling distribution, ``softmax(logits / temperature)`` (as veRL):
    otherwise PPO's ratio would compare against a distribution the tokens were not drawn from.
    """
    width = trajectory.input_ids.shape[1] - 1
    old_logp, ref_logp, values = [], [], []
    for rows in torch.arange(len(trajectory)).split(max(micro_batch_size, 1)):
        ids, attn, _ = _trimmed(trajectory, rows)
        logits, shared_values = actor_critic.policy_forward(ids, attn)
        old_logp.append(_pad_to(core.logprobs_from_logits(logits.float() / temperature, ids[:, 1:]), width))
        ref_logits = actor_critic.reference_logits(ids, attn)
        ref_logp.append(_pad_to(core.logprobs_from_logits(ref_logits.float() / temperature, ids[:, 1:]), width))
        if need_values:
            v = shared_values if shared_values is not None else actor_critic.critic_values(ids, attn)
            values.append(_pad_to(v.float(), width))
    out_values = torch.cat(values) if need_values else torch.zeros_like(torch.cat(old_logp))
    return torch.cat(old_logp), torch.cat(ref_logp), out_values


def _grad_norm_and_clip(module, params, max_norm: float) -> float:
    """Clip by global norm and return the norm before clipping (DeepSpeed clips inside its engine,
    by its ``gradient_clipping`` setting; FSDP is refused at setup, see ``StepSearchPPO.setup``)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(module.trainer.strategy, DeepSpeedStrategy):
        return float("nan")
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _ddp_strategy(module):
    """The strategy when it is multi-process DDP (gradients averaged here), else ``None``.

    PPO runs several backward passes per step, each through part of the parameters (actor loss,
    critic loss), which DDP's per-backward reducer rejects ("parameters that were not used in
    producing the loss"). So backward runs under ``block_backward_sync`` and gradients are averaged
    once per optimizer step (DeepSpeed, a DDP subclass, reduces its own gradients).
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    strategy = module.trainer.strategy
    if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy) and strategy.world_size > 1:
        return strategy
    return None


def _average_gradients(params, world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params``; every rank runs the same graph, so the set of
    parameters with a gradient is the same on all ranks."""
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world_size)


def ppo_iteration(module, trajectory, placed_scores: torch.Tensor) -> dict[str, float]:
    """Advantages from the rollout, then ``ppo_epochs`` × minibatch updates. Returns logged stats."""
    ac, cfg = module.actor_critic, module.ppo
    grpo = cfg.algorithm == "grpo"
    batch = len(trajectory)
    ids, attn = trajectory.input_ids, trajectory.attention_mask
    positions = torch.arange(ids.shape[1], device=ids.device)
    policy_mask = trajectory.loss_mask[:, 1:].float()
    response_mask = ((positions[None, :] >= trajectory.prompt_lengths[:, None]) & attn.bool())[:, 1:].float()
    value_mask = response_mask if cfg.released_gae else policy_mask

    temperature = max(module.rollout_config.temperature, 1e-6)
    old_logp, ref_logp, old_values = score_batch(ac, trajectory, cfg.micro_batch_size, need_values=not grpo,
                                                 temperature=temperature)
    token_scores = placed_scores[:, 1:].float()
    if grpo:
        kl_tokens = core.kl_penalty(old_logp, ref_logp, cfg.kl_estimator) * policy_mask
        sequence_scores = token_scores.sum(1)
        groups = torch.arange(batch, device=ids.device) // cfg.grpo_group_size
        advantages = core.grpo_advantages(sequence_scores, groups)[:, None] * policy_mask
        returns = torch.zeros_like(advantages)
    else:
        beta = module.kl_controller.value
        token_rewards, kl_tokens = core.kl_shaped_rewards(token_scores, old_logp, ref_logp, policy_mask, beta, cfg.kl_estimator)
        advantages, returns = core.compute_gae(
            token_rewards, old_values, policy_mask, gamma=cfg.gamma, lam=cfg.lam,
            skip_masked=not cfg.released_gae, response_mask=response_mask,
        )
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, value_mask)
    mean_kl = float(core.masked_mean(kl_tokens, policy_mask)) if policy_mask.sum() > 0 else 0.0

    optimizers = module.optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    actor_opt = optimizers[0]
    critic_opt = optimizers[1] if len(optimizers) > 1 else None
    actor_params, critic_params = ac.actor_parameters(), ac.critic_parameters()
    generator = torch.Generator().manual_seed(module.seed + module.trainer.global_step)
    ddp = _ddp_strategy(module)
    no_sync = ddp.block_backward_sync if ddp is not None else contextlib.nullcontext
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)
        counts[name] = counts.get(name, 0) + 1

    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(batch, generator=generator)
        for minibatch in order.split(cfg.mini_batch_size):
            actor_opt.zero_grad()
            if critic_opt is not None:
                critic_opt.zero_grad()
            for rows in minibatch.split(cfg.micro_batch_size):
                weight = len(rows) / len(minibatch)
                rows_d = rows.to(ids.device)
                mb_ids, mb_attn, length = _trimmed(trajectory, rows_d)
                width = length - 1
                mask = policy_mask[rows_d, :width]
                logits, shared_values = ac.policy_forward(mb_ids, mb_attn)
                scaled = logits.float() / temperature
                logp = core.logprobs_from_logits(scaled, mb_ids[:, 1:])
                entropy = core.masked_mean(core.entropy_from_logits(scaled), mask)
                pg_loss, pg_stats = core.policy_loss(
                    logp, old_logp[rows_d, :width], advantages[rows_d, :width], mask, clip_eps=cfg.clip_eps)
                loss = pg_loss - cfg.entropy_coef * entropy
                if grpo:
                    kl_loss = core.masked_mean(core.kl_penalty(logp, ref_logp[rows_d, :width], "k3"), mask)
                    loss = loss + cfg.kl_coef * kl_loss
                    add("kl_loss", kl_loss.detach())
                vmask = value_mask[rows_d, :width]
                if shared_values is not None and not grpo:
                    v_loss, v_stats = core.value_loss(shared_values.float(), old_values[rows_d, :width],
                                                      returns[rows_d, :width], vmask, clip=cfg.value_clip)
                    loss = loss + cfg.value_coef * v_loss
                    add("value_loss", v_loss.detach())
                    add("value_clip_frac", v_stats.get("vf_clip_frac", 0.0))
                with no_sync():
                    module.manual_backward(loss * weight)
                if critic_opt is not None and not grpo:
                    values = ac.critic_values(mb_ids, mb_attn).float()
                    v_loss, v_stats = core.value_loss(values, old_values[rows_d, :width], returns[rows_d, :width],
                                                      vmask, clip=cfg.value_clip)
                    with no_sync():
                        module.manual_backward(v_loss * weight)
                    add("value_loss", v_loss.detach())
                    add("value_clip_frac", v_stats.get("vf_clip_frac", 0.0))
                add("policy_loss", pg_loss.detach())
                add("entropy", entropy.detach())
                add("clip_frac", pg_stats.get("clip_frac", 0.0))
                add("approx_kl", pg_stats.get("approx_kl", 0.0))
            if ddp is not None:
                _average_gradients(actor_params, ddp.world_size)
                if critic_opt is not None and not grpo:
                    _average_gradients(critic_params, ddp.world_size)
            add("actor_grad_norm", _grad_norm_and_clip(module, actor_params, module.optim.grad_clip))
            actor_opt.step()
            if critic_opt is not None and not grpo:
                add("critic_grad_norm", _grad_norm_and_clip(module, critic_params, module.optim.grad_clip))
                critic_opt.step()

    schedulers = module.lr_schedulers()
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []
    for scheduler in schedulers[:1] if grpo else schedulers:  # GRPO never steps the critic's optimizer
        scheduler.step()
    module.kl_controller.update(mean_kl, batch)

    stats = {name: sums[name] / counts[name] for name in sums}
    stats.update({
        "kl": mean_kl,
        "advantage_mean": float(core.masked_mean(advantages, value_mask)) if value_mask.sum() > 0 else 0.0,
        "return_mean": float(core.masked_mean(returns, value_mask)) if value_mask.sum() > 0 else 0.0,
        "value_mean": float(core.masked_mean(old_values, value_mask)) if value_mask.sum() > 0 else 0.0,
        "actor_lr": float(actor_opt.param_groups[0]["lr"]),
    })
    return stats
