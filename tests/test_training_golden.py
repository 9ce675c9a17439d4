"""The PPO iteration against an independent float64 reference, and its invariances.

- golden step: ``training.ppo_iteration`` (lean chunked log-probs, global token-mean, GAE, whitening,
  two PPO epochs over two minibatches, separate critic) on a tiny random Qwen2 and a synthetic
  rollout batch, against the same iteration written here from the formulas with full float64 logits
  (parameter deltas within float32's rounding bound, ``training_fixtures.float32_update_bound``;
  plain SGD so every gradient scale shows in the update);
- micro-batch invariance: micro-batch 1, 3, 4 and 16 give the same parameters (AdamW);
- seq-mean-token-mean: the named alternative aggregation, same invariance;
- reproducibility: drawing from the global RNG before building the models changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from training_fixtures import (_one_thread, float32_update_bound, plain_collectives,  # noqa: F401
                               relative_update_difference, synthetic_batch, tiny_model_dir)

from stepsearch.models.policy import ActorCritic, PolicySettings
from stepsearch.training.module import PPOSettings
from stepsearch.training.iteration import ppo_iteration

TEMPERATURE = 0.7
BETA = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.getbasetemp())


def _actor_critic(path, **settings) -> ActorCritic:
    return ActorCritic(PolicySettings(name_or_path=str(path), logprob_chunk_tokens=5, **settings), seed=3)


def _run(ac, batch, cfg, optimizers, seed=7):
    params = [ac.actor_parameters(), ac.critic_parameters()]
    return ppo_iteration(ac, copy.deepcopy(batch), cfg, optimizers, params, plain_collectives(), beta=BETA,
                         temperature=TEMPERATURE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- the float64 reference


def _logits64(model, ids, attn):
    return model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1] / TEMPERATURE


def _reference_iteration(ac, batch, cfg, lr, seed=7):
    """One PPO iteration from METHOD.md §3, float64, full logits, explicit loops: returns the actor
    and critic parameters after it."""
    policy = copy.deepcopy(ac.policy).double()
    reference = copy.deepcopy(ac.reference).double()
    critic = copy.deepcopy(ac.critic).double()
    ids, attn = batch.input_ids, batch.attention_mask
    mask, labels = batch.policy_mask, ids[:, 1:]
    with torch.no_grad():
        old = torch.log_softmax(_logits64(policy, ids, attn), -1).gather(-1, labels[..., None])[..., 0]
        ref = torch.log_softmax(_logits64(reference, ids, attn), -1).gather(-1, labels[..., None])[..., 0]
        hidden = critic.trunk(input_ids=ids, attention_mask=attn).last_hidden_state
        values = (hidden @ critic.value_head.linear.weight.T + critic.value_head.linear.bias)[..., 0][:, :-1]
    rows, width = mask.shape
    adv = torch.zeros(rows, width, dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for b in range(rows):  # GAE over policy tokens only, environment tokens skipped
        positions = [j for j in range(width) if mask[b, j]]
        running, next_value = 0.0, 0.0
        for j in reversed(positions):
            reward = float(batch.token_scores[b, j]) - BETA * float(old[b, j] - ref[b, j])
            delta = reward + cfg.gamma * next_value - float(values[b, j])
            running = delta + cfg.gamma * cfg.lam * running
            adv[b, j], ret[b, j] = running, running + float(values[b, j])
            next_value = float(values[b, j])
    picked = adv[mask]
    adv = torch.where(mask, (adv - picked.mean()) / torch.sqrt(picked.var(unbiased=True) + 1e-8), 0.0)

    blocks = list(torch.arange(rows).split(cfg.mini_batch_size))
    generator = torch.Generator().manual_seed(seed)
    order = [blocks[int(k)] for _ in range(cfg.ppo_epochs) for k in torch.randperm(len(blocks), generator=generator)]
    for mb in order:
        m = mask[mb]
        n = m.sum()
        logits = _logits64(policy, ids[mb], attn[mb])
        logp = torch.log_softmax(logits, -1).gather(-1, labels[mb][..., None])[..., 0]
        ratio = torch.exp(logp - old[mb])
        a = adv[mb]
        surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1)
        loss = (surrogate[m].sum() - cfg.entropy_coef * entropy[m].sum()) / n
        policy.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= lr * p.grad
    for mb in order:
        m = mask[mb]
        hidden = critic.trunk(input_ids=ids[mb], attention_mask=attn[mb]).last_hidden_state
        v = (hidden @ critic.value_head.linear.weight.T + critic.value_head.linear.bias)[..., 0][:, :-1]
        v_old, r = values[mb], ret[mb]
        clipped = v_old + (v - v_old).clamp(-cfg.value_clip, cfg.value_clip)
        loss = 0.5 * torch.maximum((v - r) ** 2, (clipped - r) ** 2)[m].sum() / m.sum()
        critic.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in critic.parameters():
                p -= lr * p.grad
    return list(policy.parameters()), list(critic.parameters())


def test_golden_step_matches_float64_reference(tiny):
    ac = _actor_critic(tiny)
    vocab = ac.policy.config.vocab_size
    batch = synthetic_batch(8, 24, vocab, seed=1)
    cfg = PPOSettings(ppo_epochs=2, mini_batch_size=4, micro_batch_size=3, entropy_coef=0.01, kl_coef=BETA,
                      clip_eps=0.2, value_clip=0.5)
    lr = 0.05
    expected_actor, expected_critic = _reference_iteration(ac, batch, cfg, lr)
    before = [p.detach().clone() for p in ac.actor_parameters() + ac.critic_parameters()]
    optimizers = [torch.optim.SGD(ac.actor_parameters(), lr=lr), torch.optim.SGD(ac.critic_parameters(), lr=lr)]
    stats = _run(ac, batch, cfg, optimizers)
    after = ac.actor_parameters() + ac.critic_parameters()
    expected = expected_actor + expected_critic
    assert len(after) == len(expected)
    biggest = max(float((e.detach() - b.double()).abs().max()) for b, e in zip(before, expected))
    # float32 against float64: each delta is off by at most the float32 rounding bound (eps x the
    # reductions of 8 rows x 24 tokens and of the model's widths, x 4 optimizer steps: ~1e-5 here)
    # times the size of the update; measured ~2e-7, a micro-batch loss with the wrong denominator ~2e-2.
    atol = float32_update_bound(ac.policy.config, tokens=cfg.mini_batch_size * 24, steps=cfg.ppo_epochs * 2) * biggest
    for b, a, e in zip(before, after, expected):
        delta, expected_delta = (a.detach() - b).double(), e.detach() - b.double()
        torch.testing.assert_close(delta, expected_delta, rtol=0, atol=atol)
    assert biggest > 1e-3  # the update is large enough for the tolerance to mean something
    assert stats["clip_frac"] > 0  # the second epoch runs off-policy: clipping was exercised


def _adamw(ac, lr=1e-3):
    return [torch.optim.AdamW(ac.actor_parameters(), lr=lr), torch.optim.AdamW(ac.critic_parameters(), lr=lr)]


def _params(ac) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ac.actor_parameters() + ac.critic_parameters()]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_size_does_not_change_the_update(tiny, loss_agg):
    base = _actor_critic(tiny)
    batch = synthetic_batch(16, 20, base.policy.config.vocab_size, seed=2)
    results = []
    for micro in (1, 3, 4, 16):  # 3: uneven micro-batches (3, 3, 2), where a per-micro-batch mean is no constant scale
        ac = copy.deepcopy(base)
        cfg = PPOSettings(ppo_epochs=2, mini_batch_size=8, micro_batch_size=micro, entropy_coef=0.01,
                          loss_agg=loss_agg)
        _run(ac, batch, cfg, _adamw(ac))
        results.append(_params(ac))
    start = _params(base)
    # Both runs round in float32 (each within the bound of the exact update), in different orders;
    # Adam's m/sqrt(v) can double a relative gradient error: 2 runs x 2 = 4x the bound of 8 rows x 20
    # tokens over 2 epochs x 2 minibatches (~1.6e-3 of the update; measured 1e-5..2.5e-5, a micro-batch
    # loss with the wrong denominator ~1e-1).
    bound = 4 * float32_update_bound(base.policy.config, tokens=8 * 20, steps=2 * 2)
    for other in results[1:]:
        assert relative_update_difference(other, results[0], start) <= bound
    moved = sum(int((p - s).ne(0).sum()) for p, s in zip(results[0], start))
    assert moved > 0.9 * sum(s.numel() for s in start)


def test_fresh_and_reused_process_give_the_same_update(tiny, tmp_path):
    """Building the world/tiny model first (global-RNG draws) must not change the models' init nor
    the update: each model initialises from its own seeded generator."""
    from stepsearch.models.tiny import make_tiny_model

    torch.manual_seed(0)
    fresh = _actor_critic(tiny)
    torch.manual_seed(0)
    make_tiny_model(tmp_path / "other", [], seed=5, vocab_size=300, hidden_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, intermediate_size=32)
    torch.rand(1000)
    reused = _actor_critic(tiny)
    batch = synthetic_batch(8, 16, fresh.policy.config.vocab_size, seed=3)
    cfg = PPOSettings(ppo_epochs=1, mini_batch_size=4, micro_batch_size=4)
    for ac in (fresh, reused):
        _run(ac, batch, cfg, _adamw(ac))
    for a, b in zip(_params(fresh), _params(reused)):
        assert torch.equal(a, b)
