"""REINFORCE++ (``ppo/algorithms/reinforce_plus_plus.py``) against an independent float64 reference.

- golden step: ``training.ppo_iteration`` with ``algorithm: reinforce_plus_plus`` (token rewards =
  placed − β·KL, discounted returns over policy tokens with γ = 0.9, whitened over the batch, two PPO
  epochs over two minibatches of the clipped loss) on a tiny random Qwen2 and a synthetic rollout,
  against the same iteration written here from the definition with full float64 logits (parameter
  deltas within float32's rounding bound, plain SGD); the critic is neither scored nor updated;
- the update does not depend on ``micro_batch_size``;
- the estimator alone: with two "ranks", whitening uses the global batch's statistics.
"""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch
from training_fixtures import (_one_thread, float32_update_bound, plain_collectives,  # noqa: F401
                               relative_update_difference, synthetic_batch, tiny_model_dir)

from stepsearch.models.policy import ActorCritic, PolicySettings
from stepsearch.ppo.algorithms import resolve_algorithm
from stepsearch.training.iteration import ppo_iteration
from stepsearch.training.module import PPOSettings

TEMPERATURE = 0.7
BETA = 0.05
GAMMA = 0.9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.getbasetemp())


def _settings(**overrides) -> PPOSettings:
    return PPOSettings(**{"algorithm": "reinforce_plus_plus", "ppo_epochs": 2, "mini_batch_size": 4,
                          "micro_batch_size": 3, "entropy_coef": 0.01, "kl_coef": BETA, "clip_eps": 0.2,
                          "gamma": GAMMA, "lam": 0.5, **overrides})  # lam is not REINFORCE++'s: ignored


def _run(ac, batch, cfg, optimizers, seed=7):
    params = [ac.actor_parameters(), ac.critic_parameters()]
    return ppo_iteration(ac, copy.deepcopy(batch), cfg, optimizers, params, plain_collectives(), beta=BETA,
                         temperature=TEMPERATURE, generator=torch.Generator().manual_seed(seed),
                         algorithm=resolve_algorithm(cfg))


def _reference_returns(scores, old, ref, mask):
    """Discounted returns of placed − β·(old − ref) over each row's policy tokens, written out."""
    rows, width = mask.shape
    returns = torch.zeros(rows, width, dtype=torch.float64)
    for b in range(rows):
        running = 0.0
        for j in reversed([j for j in range(width) if mask[b, j]]):  # environment tokens skipped
            running = float(scores[b, j]) - BETA * float(old[b, j] - ref[b, j]) + GAMMA * running
            returns[b, j] = running
    return returns


def _whiten(x, mask):
    picked = x[mask]
    return torch.where(mask, (x - picked.mean()) / torch.sqrt(picked.var(unbiased=True) + 1e-8), 0.0)


def _reference_iteration(ac, batch, cfg, lr, seed=7):
    policy = copy.deepcopy(ac.policy).double()
    reference = copy.deepcopy(ac.reference).double()
    ids, attn = batch.input_ids, batch.attention_mask
    mask, labels = batch.policy_mask, ids[:, 1:]

    def logits64(model, rows):
        return model(input_ids=ids[rows], attention_mask=attn[rows], use_cache=False).logits[:, :-1] / TEMPERATURE

    everything = torch.arange(len(ids))
    with torch.no_grad():
        old = torch.log_softmax(logits64(policy, everything), -1).gather(-1, labels[..., None])[..., 0]
        ref = torch.log_softmax(logits64(reference, everything), -1).gather(-1, labels[..., None])[..., 0]
    adv = _whiten(_reference_returns(batch.token_scores, old, ref, mask), mask)

    blocks = list(torch.arange(len(ids)).split(cfg.mini_batch_size))
    generator = torch.Generator().manual_seed(seed)
    order = [blocks[int(k)] for _ in range(cfg.ppo_epochs) for k in torch.randperm(len(blocks), generator=generator)]
    for mb in order:
        m = mask[mb]
        logits = logits64(policy, mb)
        logp = torch.log_softmax(logits, -1).gather(-1, labels[mb][..., None])[..., 0]
        ratio = torch.exp(logp - old[mb])
        surrogate = torch.maximum(-adv[mb] * ratio, -adv[mb] * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        loss = (surrogate[m].sum() - cfg.entropy_coef * entropy[m].sum()) / m.sum()
        policy.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= lr * p.grad
    return list(policy.parameters())


def test_golden_step_matches_float64_reference(tiny):
    ac = ActorCritic(PolicySettings(name_or_path=str(tiny), logprob_chunk_tokens=5), seed=3)
    batch = synthetic_batch(8, 24, ac.policy.config.vocab_size, seed=1)
    cfg, lr = _settings(), 0.05
    expected = _reference_iteration(ac, batch, cfg, lr)
    before = [p.detach().clone() for p in ac.actor_parameters()]
    critic_before = [p.detach().clone() for p in ac.critic_parameters()]
    calls = []
    original_values = ac.values
    ac.values = lambda *a, **k: calls.append(1) or original_values(*a, **k)
    optimizers = [torch.optim.SGD(ac.actor_parameters(), lr=lr), torch.optim.SGD(ac.critic_parameters(), lr=lr)]
    stats = _run(ac, batch, cfg, optimizers)
    biggest = max(float((e.detach() - b.double()).abs().max()) for b, e in zip(before, expected))
    # float32 against float64: within the float32 rounding bound (eps x the reductions of 4 rows x 24
    # tokens and of the model's widths, x 2 epochs x 2 minibatches) times the size of the update.
    atol = float32_update_bound(ac.policy.config, tokens=cfg.mini_batch_size * 24, steps=cfg.ppo_epochs * 2) * biggest
    for b, a, e in zip(before, ac.actor_parameters(), expected):
        delta, expected_delta = (a.detach() - b).double(), e.detach() - b.double()
        torch.testing.assert_close(delta, expected_delta, rtol=0, atol=atol)
    assert biggest > 1e-3  # the update is large enough for the tolerance to mean something
    assert stats["clip_frac"] > 0  # the second epoch runs off-policy: clipping was exercised
    assert calls == [] and all(torch.equal(b, p) for b, p in zip(critic_before, ac.critic_parameters()))
    assert "value_loss" not in stats and "critic_grad_norm" not in stats


def test_micro_batch_size_does_not_change_the_update(tiny):
    base = ActorCritic(PolicySettings(name_or_path=str(tiny), logprob_chunk_tokens=5), seed=3)
    batch = synthetic_batch(16, 20, base.policy.config.vocab_size, seed=2)
    results = []
    for micro in (1, 3, 16):  # 3: uneven micro-batches (3, 3, 2)
        ac = copy.deepcopy(base)
        _run(ac, batch, _settings(mini_batch_size=8, micro_batch_size=micro),
             [torch.optim.AdamW(ac.actor_parameters(), lr=1e-3)])
        results.append([p.detach().clone() for p in ac.actor_parameters()])
    # Two float32 runs, each within the bound of the exact update, x 2 for Adam's m/sqrt(v): 4x the
    # bound of 8 rows x 20 tokens over 2 epochs x 2 minibatches, relative to the update.
    bound = 4 * float32_update_bound(base.policy.config, tokens=8 * 20, steps=2 * 2)
    for other in results[1:]:
        assert relative_update_difference(other, results[0], base.actor_parameters()) <= bound


def test_whitening_is_over_the_global_batch():
    """Two "ranks" (threads with a summing all-reduce) holding halves of the batch get the advantages
    one process gets for all of it; the returns are the reference's."""
    batch = synthetic_batch(8, 16, 50, seed=4)
    cfg = _settings()
    algorithm = resolve_algorithm(cfg)
    rewards, mask, response = batch.token_scores.double(), batch.policy_mask, batch.response_mask
    zeros = torch.zeros_like(rewards)
    single = SimpleNamespace(reduce_sum=lambda t: t.clone(), gather=lambda t: t, rank=0)
    whole, returns = algorithm.estimator(rewards, zeros, mask, response, batch.group_ids, cfg=cfg, comm=single)
    expected_returns = _reference_returns(batch.token_scores, zeros, zeros, mask)
    torch.testing.assert_close(returns, expected_returns, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole, _whiten(expected_returns, mask), rtol=0, atol=1e-10)

    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def reduce_sum(rank, tensor):
        slots[rank] = tensor
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()  # both have read before the next call overwrites a slot
        return total

    def rank_main(rank):
        rows = slice(4 * rank, 4 * rank + 4)
        comm = SimpleNamespace(reduce_sum=lambda t: reduce_sum(rank, t), gather=None, rank=rank)
        results[rank] = algorithm.estimator(rewards[rows], zeros[rows], mask[rows], response[rows],
                                            batch.group_ids[rows], cfg=cfg, comm=comm)[0]

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    torch.testing.assert_close(torch.cat(results), whole, rtol=0, atol=1e-10)
