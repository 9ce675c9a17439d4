"""One PPO iteration in pure parts: scoring, advantages over the global batch, actor and critic updates.

Kept apart from ``module.py`` so the Lightning hooks stay short; the math lives in
``stepsearch.ppo.core`` (pure tensors). Column ``j`` of every ``[B, W]`` tensor (``W = L-1``) is
token ``j + 1`` of the row (see ``models.policy`` for the alignment). Everything distributed comes in
through :class:`Collectives` (sums over ranks, gathers, the backward and optimizer step), so the same
functions run on one process, under DDP, FSDP2, and in the golden-step test with plain
``loss.backward(); opt.step()``.

Invariances the design keeps (tested): the update does not depend on ``micro_batch_size`` nor on the
number of ranks. Each minibatch's loss is aggregated by name (``token-mean`` by default) with the
denominator counted over the whole minibatch on all ranks; gradients are *summed* over micro-batches
and ranks (a strategy that averages over ranks gets its loss scaled by the world size). Minibatch
``k`` is rows ``[k·m, (k+1)·m)`` of every rank's rows (``m`` = per-rank minibatch), which with the
data sampler's strided layout (``data.sampling.GlobalBatchSampler``: rank ``r`` holds global prompts
``r, r+W, …`` of each iteration's batch) is the same set of
global rows for any number of ranks; PPO epochs visit the minibatches in an order drawn from a
generator seeded by (seed, iteration), the same on every rank. Departure from veRL/the released
code: there each epoch reshuffles rows into minibatches (rank-dependent); here the composition of
minibatches is fixed within an iteration and only their order changes.

What differs between algorithms (estimator, policy loss, KL in the reward or in the loss, critic or not)
comes from the :class:`~stepsearch.ppo.registry.Algorithm` resolved once at setup and passed in as
``algorithm`` (resolved from ``cfg.algorithm`` when a caller passes none); nothing here compares names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from stepsearch.errors import StepSearchError
from stepsearch.models.policy import scatter_rows
from stepsearch.ppo import core
from stepsearch.ppo.algorithms import resolve_algorithm
from stepsearch.ppo.algorithms.builtin import value_mask as _value_mask
from stepsearch.ppo.correction import apply_truncated_is
from stepsearch.ppo.registry import Algorithm

Tensor = torch.Tensor


@dataclass
class Collectives:
    """How an update talks to the strategy (identity/plain on one process).

    Args:
        reduce_sum: sum a tensor over all ranks (a copy on one process).
        gather: concatenate a tensor's dim 0 over all ranks, in rank order.
        backward: run backward on a loss (Lightning's ``manual_backward`` under no-sync).
        step: reduce gradients, clip and step one optimizer; returns the pre-clip gradient norm
            (non-finite: the step was skipped).
        grad_scale: multiply losses by this (the world size when the strategy averages gradients
            over ranks, so that they end up summed).
        world_size: number of ranks ``reduce_sum`` spans.
        rank: this rank's index.
    """

    reduce_sum: Callable[[Tensor], Tensor] = lambda t: t.clone()
    gather: Callable[[Tensor], Tensor] = lambda t: t
    backward: Callable[[Tensor], None] = lambda loss: loss.backward()
    step: Callable[..., float] = None
    grad_scale: float = 1.0
    world_size: int = 1
    rank: int = 0


@dataclass
class RolloutBatch:
    """A rank's share of the rollout batch as PPO sees it (all ``[B, W]`` unless noted).

    ``group_ids`` ([B] long) say which rows are samples of the same prompt (GRPO groups); they are
    global prompt ids, so groups are found across ranks, never inferred from row order.
    """

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, L]
    policy_mask: Tensor  # bool: policy-generated tokens (loss mask)
    response_mask: Tensor  # bool: every response token (after the prompt, not padding)
    token_scores: Tensor  # float: placed scores
    group_ids: Tensor  # [B] long
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    old_values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_trajectory(cls, trajectory, placed_scores: Tensor, group_ids: Tensor) -> "RolloutBatch":
        ids, attn = trajectory.input_ids, trajectory.attention_mask
        positions = torch.arange(ids.shape[1], device=ids.device)
        response = (positions[None, :] >= trajectory.prompt_lengths[:, None]) & attn.bool()
        return cls(input_ids=ids, attention_mask=attn, policy_mask=trajectory.loss_mask[:, 1:].bool(),
                   response_mask=response[:, 1:], token_scores=placed_scores[:, 1:].float(),
                   group_ids=group_ids.to(ids.device))

    def rows(self, rows: Tensor) -> tuple[Tensor, Tensor, int]:
        """Input ids and attention of ``rows``, cut to their longest real length (right padding is dead compute)."""
        attn = self.attention_mask[rows]
        length = int(attn.sum(1).max())
        return self.input_ids[rows, :length], attn[:, :length], length - 1


def value_mask(batch: RolloutBatch, released_gae: bool) -> Tensor:
    """Where values, GAE and the value loss live: policy tokens (default) or all response tokens."""
    return _value_mask(batch.policy_mask, batch.response_mask, released_gae)


@torch.no_grad()
def score_rollouts(actor_critic, batch: RolloutBatch, micro_batch_size: int, need_values: bool,
                   temperature: float = 1.0, released_gae: bool = False) -> RolloutBatch:
    """Fill old log-probs, reference log-probs and values (``[B, W]``, 0 off the masks), micro-batched.

    Log-probs are those of the sampling distribution, ``softmax(logits / temperature)`` (as veRL):
    otherwise PPO's ratio would compare against a distribution the tokens were not drawn from.
    """
    vmask = value_mask(batch, released_gae)
    shape = batch.policy_mask.shape
    old = torch.zeros(shape, device=batch.input_ids.device)
    ref, values = torch.zeros_like(old), torch.zeros_like(old)
    for rows in torch.arange(len(batch), device=old.device).split(max(micro_batch_size, 1)):
        ids, attn, width = batch.rows(rows)
        pmask, vm = batch.policy_mask[rows, :width], vmask[rows, :width]
        logp, _, shared_values = actor_critic.policy_logprobs(
            ids, attn, pmask, temperature, value_mask=vm if need_values and actor_critic.shared_critic else None)
        old[rows, :width] = scatter_rows(logp.float(), pmask)
        ref[rows, :width] = scatter_rows(actor_critic.reference_logprobs(ids, attn, pmask, temperature).float(), pmask)
        if need_values:
            v = shared_values if actor_critic.shared_critic else actor_critic.values(ids, attn, vm)
            values[rows, :width] = scatter_rows(v.float(), vm)
    batch.old_logp, batch.ref_logp, batch.old_values = old, ref, values
    return batch


def compute_advantages(batch: RolloutBatch, cfg, beta: float, comm: Collectives,
                       algorithm: Algorithm | None = None) -> dict[str, float]:
    """Advantages and returns over the GLOBAL batch (whitening / groups across ranks), by the
    algorithm's registered estimator, on placed − β·KL(old‖ref) where it puts the KL in the reward,
    else on the placed scores. Returns the global mean KL per policy token (and its token count) for
    the KL controller and the logs.
    """
    algorithm = algorithm or resolve_algorithm(cfg)
    pmask = batch.policy_mask
    if algorithm.kl_in_reward:
        rewards, kl_tokens = core.kl_shaped_rewards(batch.token_scores, batch.old_logp, batch.ref_logp, pmask, beta,
                                                   cfg.kl_estimator)
    else:
        rewards = batch.token_scores
        kl_tokens = core.kl_penalty(batch.old_logp, batch.ref_logp, cfg.kl_estimator) * pmask
    batch.advantages, batch.returns = algorithm.estimator(rewards, batch.old_values, pmask, batch.response_mask,
                                                          batch.group_ids, cfg=cfg, comm=comm)
    kl_sum, tokens = comm.reduce_sum(torch.stack([core.masked_sum(kl_tokens.float(), pmask), pmask.sum().float()]))
    return {"kl": float(kl_sum / tokens.clamp_min(1)), "policy_tokens": float(tokens)}


def minibatch_schedule(rows: int, mini_batch_size: int, epochs: int, generator: torch.Generator) -> list[Tensor]:
    """Row indices of each optimizer step: ``epochs`` passes over the fixed minibatches
    ``[k·m, (k+1)·m)`` in an order drawn from ``generator`` (see module doc: rank-invariant)."""
    blocks = list(torch.arange(rows).split(max(mini_batch_size, 1)))
    schedule = []
    for _ in range(epochs):
        schedule += [blocks[int(k)] for k in torch.randperm(len(blocks), generator=generator)]
    return schedule


class _Stats:
    """Sums and counts of logged quantities, reduced over ranks in one flat all-reduce at the end.

    Loss shares are added with count 0 per micro-batch and a count of 1/world per minibatch, so the
    reduced value is the mean over minibatches of the global minibatch loss. Values that are the
    same on every rank (gradient norms, skipped steps) are kept apart in ``same``.
    """

    def __init__(self, world_size: int):
        self.sums: dict[str, list] = {}  # name -> [sum, count], floats or 0-d float64 tensors
        self.same: dict[str, list[float]] = {}
        self.world = world_size

    def minibatch_done(self, names, norm_name: str, norm: float) -> None:
        for name in names:
            self.add(name, 0.0, 1.0 / self.world)
        finite = bool(torch.isfinite(torch.tensor(norm)))
        entry = self.same.setdefault(norm_name, [0.0, 0.0])
        if finite:
            entry[0] += norm
            entry[1] += 1
        self.same.setdefault("skipped_steps", [0.0, 1.0])[0] += 0.0 if finite else 1.0

    def add(self, name: str, value, count=1.0) -> None:
        """Accumulate ``value`` (a float or a tensor: tensors stay on their device, no sync per
        micro-batch) with weight ``count``."""
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + (value.detach().double() if torch.is_tensor(value) else float(value))
        entry[1] = entry[1] + (count.detach().double() if torch.is_tensor(count) else float(count))

    def reduce(self, comm: Collectives) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        values = [v for n in names for v in self.sums[n]]
        device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        totals = comm.reduce_sum(local).tolist()  # the one device sync of the statistics
        out = {n: totals[2 * i] / max(totals[2 * i + 1], 1e-12) for i, n in enumerate(names)}
        return out | {n: total / max(count, 1.0) for n, (total, count) in self.same.items()}


def actor_update(actor_critic, batch: RolloutBatch, schedule: list[Tensor], cfg, optimizer, params,
                 comm: Collectives, temperature: float = 1.0, algorithm: Algorithm | None = None) -> dict[str, float]:
    """The algorithm's policy loss − entropy bonus (+ its KL loss; + the shared head's value loss when it
    has a critic), one optimizer step per minibatch of ``schedule``, micro-batched by ``cfg.micro_batch_size``."""
    algorithm = algorithm or resolve_algorithm(cfg)
    kl_loss_on, shared = algorithm.kl_loss, actor_critic.shared_critic and algorithm.critic
    vmask_all = value_mask(batch, cfg.released_gae)
    entropy_mode = "grad" if cfg.entropy_coef else "detached"
    stats = _Stats(comm.world_size)
    for minibatch in schedule:
        minibatch = minibatch.to(batch.input_ids.device)
        denom = comm.reduce_sum(torch.stack([core.aggregation_count(batch.policy_mask[minibatch], cfg.loss_agg),
                                             core.aggregation_count(vmask_all[minibatch], cfg.loss_agg)]).float())
        optimizer.zero_grad()
        for rows in minibatch.split(max(cfg.micro_batch_size, 1)):
            ids, attn, width = batch.rows(rows)
            pmask, vmask = batch.policy_mask[rows, :width], vmask_all[rows, :width]
            logp_flat, ent_flat, values_flat = actor_critic.policy_logprobs(
                ids, attn, pmask, temperature, entropy=entropy_mode, value_mask=vmask if shared else None)
            logp = scatter_rows(logp_flat, pmask)
            pg_loss, pg_stats = algorithm.loss(logp, batch.old_logp[rows, :width], batch.advantages[rows, :width],
                                               pmask, cfg=cfg, loss_agg=cfg.loss_agg, denominator=denom[0])
            entropy = core.aggregate_loss(scatter_rows(ent_flat, pmask), pmask, cfg.loss_agg, denom[0])
            loss = pg_loss - cfg.entropy_coef * entropy if cfg.entropy_coef else pg_loss
            if kl_loss_on:
                kl = core.kl_penalty(logp, batch.ref_logp[rows, :width], "k3")
                kl_loss = core.aggregate_loss(kl, pmask, cfg.loss_agg, denom[0])
                loss = loss + cfg.kl_coef * kl_loss
                stats.add("kl_loss", kl_loss.detach(), 0.0)
            if shared:
                v_loss, v_stats = core.value_loss(scatter_rows(values_flat, vmask), batch.old_values[rows, :width],
                                                  batch.returns[rows, :width], vmask, clip=cfg.value_clip,
                                                  loss_agg=cfg.loss_agg, denominator=denom[1])
                loss = loss + cfg.value_coef * v_loss
                stats.add("value_loss", v_loss.detach(), 0.0)
                _add_fraction(stats, "value_clip_frac", v_stats["vf_clip_frac"], vmask)
            comm.backward(loss * comm.grad_scale)
            stats.add("policy_loss", pg_loss.detach(), 0.0)
            stats.add("entropy", entropy.detach(), 0.0)
            _add_fraction(stats, "clip_frac", pg_stats["clip_frac"], pmask)
            _add_fraction(stats, "approx_kl", pg_stats["approx_kl"], pmask)
        names = ("policy_loss", "entropy") + (("kl_loss",) if kl_loss_on else ()) + (("value_loss",) if shared else ())
        stats.minibatch_done(names, "actor_grad_norm", comm.step(optimizer, params))
    return stats.reduce(comm)


def critic_update(actor_critic, batch: RolloutBatch, schedule: list[Tensor], cfg, optimizer, params,
                  comm: Collectives) -> dict[str, float]:
    """Clipped value loss on the separate critic, one optimizer step per minibatch of ``schedule``."""
    vmask_all = value_mask(batch, cfg.released_gae)
    stats = _Stats(comm.world_size)
    for minibatch in schedule:
        minibatch = minibatch.to(batch.input_ids.device)
        denom = comm.reduce_sum(core.aggregation_count(vmask_all[minibatch], cfg.loss_agg).float().reshape(1))[0]
        optimizer.zero_grad()
        for rows in minibatch.split(max(cfg.micro_batch_size, 1)):
            ids, attn, width = batch.rows(rows)
            vmask = vmask_all[rows, :width]
            values = scatter_rows(actor_critic.values(ids, attn, vmask), vmask)
            v_loss, v_stats = core.value_loss(values, batch.old_values[rows, :width], batch.returns[rows, :width],
                                              vmask, clip=cfg.value_clip, loss_agg=cfg.loss_agg, denominator=denom)
            comm.backward(v_loss * comm.grad_scale)
            stats.add("value_loss", v_loss.detach(), 0.0)
            _add_fraction(stats, "value_clip_frac", v_stats["vf_clip_frac"], vmask)
        stats.minibatch_done(("value_loss",), "critic_grad_norm", comm.step(optimizer, params))
    return stats.reduce(comm)


def _add_fraction(stats: _Stats, name: str, local_mean: Tensor, mask: Tensor) -> None:
    count = mask.sum().double()
    stats.add(name, torch.as_tensor(local_mean).detach().double() * count, count)


def ppo_iteration(actor_critic, batch: RolloutBatch, cfg, optimizers, params, comm: Collectives, *,
                  beta: float, temperature: float, generator: torch.Generator,
                  algorithm: Algorithm | None = None) -> dict[str, float]:
    """Score, advantages over the global batch, then the actor (and separate critic) updates.

    ``cfg.tis_cap`` (truncated importance sampling, ``stepsearch.ppo.correction``) weights the advantages
    by the engine's log-probs, which come in ``batch.extras["rollout_logp"]``."""
    algorithm = algorithm or resolve_algorithm(cfg)
    score_rollouts(actor_critic, batch, cfg.micro_batch_size, need_values=algorithm.critic, temperature=temperature,
                   released_gae=cfg.released_gae)
    stats = compute_advantages(batch, cfg, beta, comm, algorithm)
    if cfg.tis_cap is not None:
        if "rollout_logp" not in batch.extras:
            raise StepSearchError("model.ppo.tis_cap needs the rollout engine's log-probs, which this engine did not "
                                  "return")
        stats.update(apply_truncated_is(batch, comm.reduce_sum, cap=cfg.tis_cap))
    schedule = minibatch_schedule(len(batch), cfg.mini_batch_size, cfg.ppo_epochs, generator)
    actor_opt, critic_opt = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
    actor_stats = actor_update(actor_critic, batch, schedule, cfg, actor_opt, params[0], comm, temperature, algorithm)
    stats.update(actor_stats)
    if critic_opt is not None and algorithm.critic:
        critic_stats = critic_update(actor_critic, batch, schedule, cfg, critic_opt, params[1], comm)
        critic_stats["skipped_steps"] += stats["skipped_steps"]
        stats.update(critic_stats)
    vmask = value_mask(batch, cfg.released_gae)
    means = comm.reduce_sum(torch.stack([core.masked_sum(batch.advantages.float(), vmask),
                                         core.masked_sum(batch.returns.float(), vmask),
                                         core.masked_sum(batch.old_values.float(), vmask), vmask.sum().float()]))
    count = means[3].clamp_min(1)
    stats.update({"advantage_mean": float(means[0] / count), "return_mean": float(means[1] / count),
                  "value_mean": float(means[2] / count)})
    return stats
