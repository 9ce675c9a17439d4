"""PPO core against plain float64 per-token reference loops (METHOD.md §3)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from stepsearch.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from stepsearch.ppo import core

F64 = torch.float64


def random_masks(batch=5, length=23, seed=0):
    """Rows like the rollout's: prompt, policy/env segments, right padding."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.zeros(batch, length, dtype=torch.bool)
    response = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        prompt = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(prompt + 3, length + 1, (1,), generator=g))
        response[b, prompt:end] = True
        for i in range(prompt, end):
            policy[b, i] = bool(torch.rand(1, generator=g) < 0.6)
        policy[b, end - 1] = True  # the last response token is the policy's answer
    return policy, response


# ---------------------------------------------------------------- reference loops


def ref_gae(rewards, values, recursion, gamma, lam):
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        positions = [i for i in range(values.shape[1]) if recursion[b, i]]
        running = 0.0
        for j in reversed(range(len(positions))):
            k = positions[j]
            next_value = values[b, positions[j + 1]].item() if j + 1 < len(positions) else 0.0
            delta = rewards[b, k].item() + gamma * next_value - values[b, k].item()
            running = delta + gamma * lam * running
            adv[b, k] = running
    returns = torch.where(recursion, adv + values, torch.zeros_like(values))
    return adv, returns


def ref_masked(x, mask):
    return [x[b, i].item() for b in range(x.shape[0]) for i in range(x.shape[1]) if mask[b, i]]


# ---------------------------------------------------------------- tests


def test_masked_stats_and_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=F64)
    mask, _ = random_masks(4, 9, seed=1)
    x_bad = x.clone()
    x_bad[~mask] = float("nan")  # what lies outside the mask must not matter
    kept = ref_masked(x, mask)
    mean = sum(kept) / len(kept)
    var = statistics.variance(kept)
    assert masked_mean(x_bad, mask).item() == pytest.approx(mean, abs=1e-12)
    assert masked_var(x_bad, mask).item() == pytest.approx(var, abs=1e-12)
    assert masked_var(x_bad, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(kept), abs=1e-12)
    white = masked_whiten(x_bad, mask)
    for b in range(4):
        for i in range(9):
            expected = (x[b, i].item() - mean) / math.sqrt(var + 1e-8) if mask[b, i] else 0.0
            assert white[b, i].item() == pytest.approx(expected, abs=1e-10)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(unshifted, mask).item() == pytest.approx(mean, abs=1e-10)
    rows = masked_mean(x_bad, mask, dim=1)
    for b in range(4):
        vals = [x[b, i].item() for i in range(9) if mask[b, i]]
        assert rows[b].item() == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-12)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_logprobs_and_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=F64) * 3
    labels = torch.randint(0, 11, (3, 5))
    lp = logprobs_from_logits(logits, labels)
    ent = entropy_from_logits(logits)
    for b in range(3):
        for i in range(5):
            row = logits[b, i].tolist()
            z = math.log(sum(math.exp(v) for v in row))
            assert lp[b, i].item() == pytest.approx(row[labels[b, i]] - z, abs=1e-12)
            probs = [math.exp(v - z) for v in row]
            assert ent[b, i].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-12)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, chunk_tokens=4), lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_tokens=4), ent, atol=1e-12, rtol=0)
    half = logits.to(torch.bfloat16)
    lp_half = logprobs_from_logits(half, labels)
    assert lp_half.dtype == torch.float32
    torch.testing.assert_close(lp_half, logprobs_from_logits(half.float(), labels), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy_from_logits(half), entropy_from_logits(half.float()), atol=1e-5, rtol=0)


def test_gae_hand_example_skips_environment_tokens():
    # positions: 0 prompt | 1,2 policy (</search> at 2) | 3,4 env | 5,6 policy (answer) | 7 padding
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[7.0, 0.5, 0.4, 9.0, 9.0, 0.3, 0.2, 5.0]], dtype=F64)
    rewards = torch.tensor([[0.0, 0.0, 0.1, 3.0, 0.0, 0.0, 1.0, 0.0]], dtype=F64)  # 3.0 on env: ignored
    adv, ret = compute_gae(rewards, values, mask)
    # δ6 = 1 - .2 = .8; δ5 = .2 - .3 = -.1; δ2 = .1 + .3 - .4 = 0 (next value is position 5's); δ1 = .4 - .5
    expected_adv = torch.tensor([[0.0, 0.6, 0.7, 0.0, 0.0, 0.7, 0.8, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0, 1.1, 1.1, 0, 0, 1.0, 1.0, 0]], dtype=F64), atol=1e-12, rtol=0)

    # the released recursion runs through the environment tokens (their values and rewards count)
    response = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    adv_rel, _ = compute_gae(rewards, values, mask, skip_masked=False, response_mask=response)
    # A_k = Σ_{l≥k} r_l − V_k with γ = λ = 1: position 2: (.1 + 3 + 1) − .4
    assert adv_rel[0, 2].item() == pytest.approx(4.1 - 0.4)
    assert adv_rel[0, 3].item() == pytest.approx(4.0 - 9.0)
    with pytest.raises(ValueError):
        compute_gae(rewards, values, mask, skip_masked=False)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (1.0, 0.95)])
@pytest.mark.parametrize("skip", [True, False])
def test_gae_matches_reference_loop(gamma, lam, skip):
    policy, response = random_masks(6, 31, seed=3)
    torch.manual_seed(1)
    values = torch.randn(6, 31, dtype=F64)
    rewards = torch.where(policy, torch.randn(6, 31, dtype=F64), torch.zeros((), dtype=F64))
    adv, ret = compute_gae(rewards, values, policy, gamma, lam, skip_masked=skip, response_mask=response)
    recursion = policy if skip else response
    ref_adv, ref_ret = ref_gae(rewards, values, recursion, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(ret, ref_ret, atol=1e-10, rtol=0)
    assert torch.all(adv[~recursion] == 0)


def test_gae_float32_long_rows_close_to_float64():
    policy, _ = random_masks(4, 4096, seed=5)
    torch.manual_seed(2)
    values = torch.randn(4, 4096)
    rewards = torch.where(policy, torch.randn(4, 4096) * 0.01, torch.zeros(()))
    adv, _ = compute_gae(rewards, values, policy)
    adv64, _ = compute_gae(rewards.double(), values.double(), policy)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), adv64, atol=1e-4, rtol=0)


def test_kl_penalty_kinds():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)
    for i in range(3):
        d = logp[i].item() - ref[i].item()
        assert kl_penalty(logp, ref, "k1")[i].item() == pytest.approx(d)
        assert kl_penalty(logp, ref, "kl")[i].item() == pytest.approx(d)
        assert kl_penalty(logp, ref, "k2")[i].item() == pytest.approx(0.5 * d * d)
        assert kl_penalty(logp, ref, "abs")[i].item() == pytest.approx(abs(d))
        assert kl_penalty(logp, ref, "k3")[i].item() == pytest.approx(math.exp(-d) + d - 1)
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([-100.0]), "k3").item() == 10.0  # clamped
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_kl_shaped_rewards():
    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    placed = torch.tensor([[0.0, 0.0, 0.5, 0.0]], dtype=F64)
    old = torch.tensor([[9.0, -1.0, -2.0, 9.0]], dtype=F64)
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]], dtype=F64)
    rewards, kl = kl_shaped_rewards(placed, old, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.6, 0.0]], dtype=F64))


def test_kl_controllers():
    fixed = FixedKLController(0.001)
    fixed.update(5.0, 128)
    assert fixed.value == 0.001
    adaptive = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    adaptive.update(12.0, 100)  # error 1 clipped to 0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 100 / 10000))


def test_policy_loss_matches_reference():
    policy, _ = random_masks(4, 13, seed=7)
    torch.manual_seed(3)
    logp = torch.randn(4, 13, dtype=F64) * 0.3 - 1
    old = logp + torch.randn(4, 13, dtype=F64) * 0.3
    adv = torch.randn(4, 13, dtype=F64)
    loss, stats = policy_loss(logp, old, adv, policy, clip_eps=0.2)
    terms, clipped, kls = [], [], []
    for b in range(4):
        for i in range(13):
            if not policy[b, i]:
                continue
            ratio = math.exp(logp[b, i].item() - old[b, i].item())
            a = adv[b, i].item()
            l1, l2 = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            kls.append(old[b, i].item() - logp[b, i].item())
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert stats["clip_frac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / len(kls), abs=1e-12)
    assert 0 < stats["clip_frac"].item() < 1


def test_policy_loss_gradient_is_zero_on_environment_tokens():
    policy, _ = random_masks(3, 12, seed=11)
    torch.manual_seed(4)
    logits = torch.randn(3, 12, 17, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 17, (3, 12))
    old = torch.randn(3, 12, dtype=F64) - 2
    old[~policy] = float("inf")  # garbage outside the mask must not leak into the gradient
    adv = torch.randn(3, 12, dtype=F64)
    logp = logprobs_from_logits(logits, labels)
    loss, _ = policy_loss(logp, old, adv, policy)
    entropy_bonus = masked_mean(entropy_from_logits(logits), policy)
    (loss - 0.001 * entropy_bonus).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[~policy]) == 0
    assert torch.count_nonzero(grad[policy]) > 0


def test_value_loss_matches_reference():
    policy, _ = random_masks(4, 13, seed=9)
    torch.manual_seed(5)
    values = torch.randn(4, 13, dtype=F64)
    old = values + torch.randn(4, 13, dtype=F64) * 0.6
    returns = torch.randn(4, 13, dtype=F64)
    loss, stats = value_loss(values, old, returns, policy, clip=0.5)
    terms, clipped = [], []
    for b in range(4):
        for i in range(13):
            if not policy[b, i]:
                continue
            v, vo, r = values[b, i].item(), old[b, i].item(), returns[b, i].item()
            vc = min(max(v, vo - 0.5), vo + 0.5)
            e1, e2 = (v - r) ** 2, (vc - r) ** 2
            terms.append(max(e1, e2))
            clipped.append(float(e2 > e1))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)
    assert stats["vf_clip_frac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=1e-12)
    values_g = values.clone().requires_grad_(True)
    value_loss(values_g, old, returns, policy)[0].backward()
    assert torch.count_nonzero(values_g.grad[~policy]) == 0


def test_grpo_advantages():
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.3, 0.7], dtype=F64)
    groups = ["a", "a", "a", "b", "b", "c", "a"]
    adv = grpo_advantages(scores, groups)
    for i, g in enumerate(groups):
        members = [scores[j].item() for j in range(len(groups)) if groups[j] == g]
        if len(members) == 1:
            expected = scores[i].item() / (1 + 1e-6)
        else:
            expected = (scores[i].item() - statistics.mean(members)) / (statistics.stdev(members) + 1e-6)
        assert adv[i].item() == pytest.approx(expected, abs=1e-12)
    by_tensor = grpo_advantages(scores, torch.tensor([0, 0, 0, 1, 1, 2, 0]))
    torch.testing.assert_close(by_tensor, adv)
    same = grpo_advantages(torch.tensor([0.5, 0.5, 0.5]), [1, 1, 1])
    assert torch.all(same == 0)
    with pytest.raises(ValueError):
        grpo_advantages(scores, ["a"])


def test_loss_aggregations_by_name_against_float64_sums():
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = [per_token[b][mask[b]] for b in range(3)]
    token_mean = sum(r.sum() for r in rows) / 7
    seq_mean = (rows[0].mean() + rows[1].mean()) / 2  # the empty row counts for nothing
    assert torch.isclose(core.aggregate_loss(per_token, mask, "token-mean"), token_mean)
    assert torch.isclose(core.aggregate_loss(per_token, mask, "seq-mean-token-mean"), seq_mean)
    # A micro-batch's share: the denominator of the whole minibatch (here 7 tokens + 9 elsewhere).
    assert torch.isclose(core.aggregate_loss(per_token, mask, "token-mean", denominator=16), token_mean * 7 / 16)
    assert int(core.aggregation_count(mask, "seq-mean-token-mean")) == 2
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        core.aggregate_loss(per_token, mask, "sum")


def test_whitening_with_a_cross_rank_sum_equals_whitening_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 6, generator=g) > 0.3
    whole = core.masked_whiten(x, mask)
    halves = [(x[:4], mask[:4]), (x[4:], mask[4:])]

    # Simulate rank 0 with the other rank's contribution added in by the "all-reduce".
    other_x, other_mask = halves[1]

    def reduce_sum(t):
        if t.numel() == 2:
            return t + torch.stack([core.masked_sum(other_x, other_mask), other_mask.sum().to(t.dtype)])
        mean = (core.masked_sum(x, mask) / mask.sum()).to(t.dtype)
        return t + core.masked_sum((other_x - mean) ** 2, other_mask).reshape(1)

    rank0 = core.masked_whiten(halves[0][0], halves[0][1], reduce_sum=reduce_sum)
    torch.testing.assert_close(rank0, whole[:4])
    assert not torch.allclose(core.masked_whiten(*halves[0]), whole[:4])  # local statistics differ
