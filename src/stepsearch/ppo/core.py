"""PPO math for StePPO (METHOD.md §3): pure tensor functions, no Lightning, no transformers.

Conventions: tensors are [B, L] over whole rows (prompt + response, right-padded); ``mask`` is the
loss mask (1 on policy-generated tokens only). ``logits[:, i]`` scores ``labels[:, i]`` (the caller
shifts). Every masked reduction ignores what lies outside the mask, even NaN/inf, and gradients at
masked-out positions are exactly zero (inputs are masked with ``torch.where`` before any arithmetic).

- token rewards: r_k = placed_k − β·KL_k on policy tokens, KL_k from ``kl_penalty`` (k1 default).
- GAE: δ_k = r_k + γ V_{k+1} − V_k, A_k = Σ_l (γλ)^l δ_{k+l}, returns = A + V. Our default recursion
  runs over policy tokens only: environment tokens are skipped (V_{k+1} is the value of the next
  policy token, 0 after the last) and get advantage and return 0. ``skip_masked=False`` is the
  released behaviour: the recursion runs over every response token (``response_mask``: after the
  prompt, not padding), observation tokens included. With γλ = 1 (the default) the discounted sum is
  a reverse cumulative sum, fully vectorised; otherwise a loop over the compacted length.
- whitening is the caller's step: ``masked_whiten(advantages, mask)`` (the released code whitened
  over all response tokens: pass ``response_mask`` for that); it returns 0 outside the mask.
- policy loss: masked mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logπ − logπ_old) (the log
  ratio clamped to ±20 for stability, as in verl); value loss: 0.5·masked mean of
  max((V−R)², (V_old + clip(V−V_old, ±c) − R)²).
- GRPO: A_i = (s_i − mean_g)/(std_g + ε) within each group (unbiased std, as verl; a singleton group
  uses mean 0, std 1, as verl).
- loss aggregation, registered by name (``LOSS_AGGREGATIONS``): ``token-mean`` = Σ per-token loss /
  number of masked tokens, ``seq-mean-token-mean`` = Σ over rows of the row's token mean / number of
  rows. The caller may pass the *denominator* (tokens or rows of the whole minibatch, summed over
  micro-batches and ranks: ``aggregation_count``), so each micro-batch's loss is its share of the
  minibatch loss and micro-batch split and rank count never change the gradient. Without it, the
  denominator is the tensor's own (a plain masked mean, as before).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

Tensor = torch.Tensor


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x over the mask (along ``dim`` or everything)."""
    kept = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the mask (along ``dim`` or everything); 0 where the mask is empty."""
    m = _bool(mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the whole mask (Bessel-corrected if ``unbiased`` and more than one element)."""
    m = _bool(mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        count = m.sum().to(x.dtype)
        var = var * count / (count - 1).clamp_min(1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce_sum=None) -> Tensor:
    """(x − mean)/sqrt(var + eps) over the mask (mean added back if not ``shift_mean``); 0 outside the mask.

    ``reduce_sum`` (a callable summing a tensor over all ranks, e.g. an all-reduce) makes mean and
    unbiased variance those of the global batch; by default they are this tensor's.
    """
    m = _bool(mask)
    reduce_sum = reduce_sum or (lambda t: t)
    total, count = reduce_sum(torch.stack([masked_sum(x, m), m.sum().to(x.dtype)]))
    mean = total / count.clamp_min(1)
    squares = reduce_sum(masked_sum((x - mean) ** 2, m).reshape(1))[0]
    var = squares / (count - 1).clamp_min(1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def _token_mean(per_token: Tensor, mask: Tensor, denominator: Tensor | float | None) -> Tensor:
    """[B, L] → Σ over the mask / denominator (default: the mask's token count)."""
    m = _bool(mask)
    total = masked_sum(per_token, m)
    count = m.sum().to(total.dtype) if denominator is None else torch.as_tensor(denominator, dtype=total.dtype)
    return total / count.clamp_min(1)


def _seq_mean_token_mean(per_token: Tensor, mask: Tensor, denominator: Tensor | float | None) -> Tensor:
    """[B, L] → Σ over rows of the row's masked token mean / denominator (default: rows with a token)."""
    m = _bool(mask)
    row_tokens = m.sum(-1)
    row_means = masked_sum(per_token, m, dim=-1) / row_tokens.clamp_min(1).to(per_token.dtype)
    count = (row_tokens > 0).sum().to(per_token.dtype) if denominator is None else \
        torch.as_tensor(denominator, dtype=per_token.dtype)
    return row_means.sum() / count.clamp_min(1)


LOSS_AGGREGATIONS = {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean}


def aggregation_count(mask: Tensor, mode: str = "token-mean") -> Tensor:
    """What ``mode`` divides by, for this mask: its tokens (token-mean) or rows with a token."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    m = _bool(mask)
    return m.sum() if mode == "token-mean" else (m.sum(-1) > 0).sum()


def aggregate_loss(per_token: Tensor, mask: Tensor, mode: str = "token-mean",
                   denominator: Tensor | float | None = None) -> Tensor:
    """A scalar loss from ``[B, L]`` per-token losses by the named aggregation (see module doc)."""
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {sorted(LOSS_AGGREGATIONS)}")
    return LOSS_AGGREGATIONS[mode](per_token, mask, denominator)


def _over_token_chunks(fn, logits: Tensor, *others: Tensor, chunk_tokens: int) -> Tensor:
    """Apply ``fn`` to [N, V] chunks of the flattened logits (bounds the float32 temporaries)."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_others = [o.reshape(-1) for o in others]
    pieces = []
    for i in range(0, flat.shape[0], chunk_tokens):
        chunk = _float(flat[i : i + chunk_tokens])
        pieces.append(fn(chunk, *(o[i : i + chunk_tokens] for o in flat_others)))
    if not pieces:
        return _float(flat).new_zeros(logits.shape[:-1])
    return torch.cat(pieces).reshape(logits.shape[:-1])


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """log softmax(logits)[labels] for [..., V] logits and [...] labels.

    Computed as picked logit − logsumexp, ``chunk_tokens`` positions at a time, so no full
    log-softmax copy exists; half-precision logits are upcast to float32 chunk by chunk.
    """

    def _picked(chunk: Tensor, chunk_labels: Tensor) -> Tensor:
        return chunk.gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1)

    return _over_token_chunks(_picked, logits, labels, chunk_tokens=chunk_tokens)


def entropy_from_logits(logits: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """H = logsumexp(l) − Σ softmax(l)·l over the last dim, chunked like ``logprobs_from_logits``."""

    def _entropy(chunk: Tensor) -> Tensor:
        probs = torch.softmax(chunk, dim=-1)
        return torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(-1)

    return _over_token_chunks(_entropy, logits, chunk_tokens=chunk_tokens)


def compute_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    skip_masked: bool = True,
    response_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns [B, L] (see module doc); 0 outside the recursion's mask.

    The recursion's mask is ``mask`` (policy tokens) when ``skip_masked``, else ``response_mask``
    (every response token, the released behaviour). Rewards outside it are ignored.
    """
    if skip_masked:
        recursion = _bool(mask)
    else:
        if response_mask is None:
            raise ValueError("compute_gae(skip_masked=False) needs response_mask (response tokens, no padding)")
        recursion = _bool(response_mask)
    rewards, values = _float(token_rewards), _float(values)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    batch, length = values.shape

    # Compact each row: positions in the recursion first (in order), the rest after; dest[b, i] is
    # the compact index of position i, so gather(dest) maps back and skipped tokens read zeros.
    count = recursion.sum(dim=1, keepdim=True)
    inside = torch.cumsum(recursion.long(), dim=1) - 1
    outside = count + torch.cumsum((~recursion).long(), dim=1) - 1
    dest = torch.where(recursion, inside, outside)
    compact_rewards = torch.zeros_like(rewards).scatter_(1, dest, torch.where(recursion, rewards, zero))
    compact_values = torch.zeros_like(values).scatter_(1, dest, torch.where(recursion, values, zero))

    next_values = torch.cat([compact_values[:, 1:], compact_values.new_zeros(batch, 1)], dim=1)
    valid = torch.arange(length, device=values.device).unsqueeze(0) < count
    deltas = torch.where(valid, compact_rewards + gamma * next_values - compact_values, zero)

    discount = gamma * lam
    if discount == 1.0:
        compact_adv = torch.flip(torch.cumsum(torch.flip(deltas, dims=[1]), dim=1), dims=[1])
    else:
        compact_adv = torch.zeros_like(deltas)
        running = deltas.new_zeros(batch)
        for k in reversed(range(int(count.max().item()) if batch else 0)):
            running = deltas[:, k] + discount * running
            compact_adv[:, k] = running

    advantages = torch.where(recursion, compact_adv.gather(1, dest), zero)
    returns = torch.where(recursion, advantages + values, zero)
    return advantages, returns


_KL_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3", "abs": "abs"}


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL estimate of π vs π_ref from log-probs of the sampled tokens.

    k1: logπ − logπ_ref; k2: ½(logπ − logπ_ref)²; k3 ("low variance", Schulman): e^{−x} + x − 1 with
    x = logπ − logπ_ref (x clamped to ±20, result to ±10, as verl); abs: |logπ − logπ_ref|.
    """
    name = _KL_ALIASES.get(kind)
    if name is None:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(_KL_ALIASES)}")
    diff = logp - ref_logp
    if name == "k1":
        return diff
    if name == "k2":
        return 0.5 * diff.square()
    if name == "abs":
        return diff.abs()
    neg = (-diff).clamp(-20.0, 20.0)  # log(π_ref/π)
    return (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)


class FixedKLController:
    """Constant KL coefficient β."""

    def __init__(self, kl_coef: float = 0.001) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for interface parity with the adaptive controller)."""


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target_kl > 0 and horizon > 0, got {target_kl}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_shaped_rewards(
    placed_scores: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor,
    mask: Tensor,
    beta: float,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """(token rewards = placed − β·KL on policy tokens, per-token KL, 0 outside the mask)."""
    m = _bool(mask)
    per_token = kl_penalty(_float(logp_old), _float(logp_ref), kind)
    kl = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return placed_scores - beta * kl, kl


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate aggregated by ``loss_agg`` over the mask (``denominator``: see module doc);
    stats (detached, means over this tensor's mask): clip_frac, approx_kl, ratio."""
    m = _bool(mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(m, logp - old_logp, zero).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.to(logp.dtype), zero)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), m, loss_agg, denominator)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(logp.dtype), m),
            "approx_kl": masked_mean(-log_ratio, m),  # k1 estimate of KL(π_old ‖ π)
            "ratio": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float = 0.5,
    loss_agg: str = "token-mean",
    denominator: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5·(``loss_agg`` over the mask) of max((V−R)², (clip(V, V_old±clip) − R)²).

    Stats (detached): vf_clip_frac, value_mean.
    """
    m = _bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values_m = torch.where(m, values, zero)
    old_m = torch.where(m, old_values.to(values.dtype), zero)
    returns_m = torch.where(m, returns.to(values.dtype), zero)
    clipped_values = old_m + (values_m - old_m).clamp(-clip, clip)
    unclipped_err = (values_m - returns_m).square()
    clipped_err = (clipped_values - returns_m).square()
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_err, clipped_err), m, loss_agg, denominator)
    with torch.no_grad():
        stats = {
            "vf_clip_frac": masked_mean((clipped_err > unclipped_err).to(values.dtype), m),
            "value_mean": masked_mean(values_m, m),
        }
    return loss, stats


def grpo_advantages(
    scores: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    eps: float = 1e-6,
    unbiased: bool = True,
) -> Tensor:
    """[B] group-normalised scores (s − mean_g)/(std_g + eps); singleton groups: s/(1 + eps) (verl)."""
    scores = _float(scores)
    if isinstance(group_ids, Tensor):
        _, inverse = torch.unique(group_ids.to(scores.device), return_inverse=True)
    else:
        index: dict[Hashable, int] = {}
        inverse = torch.tensor([index.setdefault(g, len(index)) for g in group_ids], device=scores.device)
    if inverse.numel() != scores.numel():
        raise ValueError(f"grpo_advantages: {scores.numel()} scores but {inverse.numel()} group ids")
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, torch.ones_like(scores)
    )
    mean = torch.zeros_like(counts).index_add_(0, inverse, scores) / counts
    sq = torch.zeros_like(counts).index_add_(0, inverse, (scores - mean[inverse]).square())
    var = sq / ((counts - 1).clamp_min(1) if unbiased else counts)
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(var), var.sqrt())
    return (scores - mean[inverse]) / (std[inverse] + eps)


__all__ = [
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "aggregate_loss",
    "aggregation_count",
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
