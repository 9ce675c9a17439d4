"""The engine on the real tiny model (random weights, so its output is malformed text): batched
KV-cache decoding must match full forward passes, be batch-invariant, seeded, and well masked."""

from __future__ import annotations

import copy

import pytest
import torch

from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.engine import RolloutConfig, RolloutEngine

QUESTIONS = ["Who was the drummer of Toto", "Where is Atlanta?", "What did Robert Plant do after 1980",
             "Which band is from Georgia", "x"]
CONFIG = RolloutConfig(max_turns=2, max_response_tokens=12, max_observation_tokens=64, max_context_tokens=1024)


@pytest.fixture(scope="module")
def model64(tiny):
    """A float64 copy of the tiny model: argmax comparisons without float32 near-ties."""
    model, _ = tiny
    return copy.deepcopy(model).double()


def _check_layout(traj, tokenizer):
    for b in range(len(traj)):
        length = int(traj.attention_mask[b].sum())
        prompt = int(traj.prompt_lengths[b])
        assert traj.attention_mask[b, :length].all() and not traj.attention_mask[b, length:].any()
        assert not traj.loss_mask[b, :prompt].any() and not traj.loss_mask[b, length:].any()
        assert (traj.input_ids[b, length:] == tokenizer.pad_token_id).all()
    assert traj.timing["tokens_generated"] == int(traj.loss_mask.sum())


def test_protocol_conformance(tiny, retriever):
    # isinstance on a runtime Protocol only checks that `generate` exists: compare signatures too.
    import inspect

    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer, retriever, CONFIG)
    assert isinstance(engine, RolloutEngine)
    expected = inspect.signature(RolloutEngine.generate).parameters
    actual = inspect.signature(type(engine).generate).parameters
    assert list(actual) == list(expected)
    assert [p.kind for p in actual.values()] == [p.kind for p in expected.values()]
    assert actual["greedy"].default is False and actual["seed"].default is None


def test_sampling_is_seeded(tiny, retriever):
    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer, retriever, CONFIG)
    first = engine.generate(QUESTIONS, seed=5)
    again = engine.generate(QUESTIONS, seed=5)
    other = engine.generate(QUESTIONS, seed=6)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.loss_mask, again.loss_mask)
    width = min(first.input_ids.shape[1], other.input_ids.shape[1])
    assert not torch.equal(first.input_ids[:, :width], other.input_ids[:, :width])
    _check_layout(first, tokenizer)
    for record in first.records:
        assert record.num_turns >= 1 and record.invalid_actions  # random text is never a clean trajectory
    # Config seed is the default.
    seeded = HFRolloutEngine(model, tokenizer, retriever, RolloutConfig(**{**CONFIG.__dict__, "seed": 5}))
    assert torch.equal(seeded.generate(QUESTIONS).input_ids, first.input_ids)


def test_greedy_tokens_are_the_argmax_of_a_full_forward(model64, tiny, retriever):
    """KV cache, left padding, dropped rows and per-turn prefill all agree with one plain forward
    over the final right-padded rows: each policy token is the argmax after its prefix."""
    _, tokenizer = tiny
    traj = HFRolloutEngine(model64, tokenizer, retriever, CONFIG).generate(QUESTIONS, greedy=True)
    _check_layout(traj, tokenizer)
    assert traj.loss_mask.sum() > 2 * len(QUESTIONS)
    with torch.no_grad():
        logits = model64(input_ids=traj.input_ids, attention_mask=traj.attention_mask).logits
    predicted = logits.argmax(-1)[:, :-1]
    policy = traj.loss_mask[:, 1:].bool()
    assert torch.equal(predicted[policy], traj.input_ids[:, 1:][policy])
    # Several turns happened (random text is an invalid action, then the warning, then another turn).
    assert max(r.num_turns for r in traj.records) == CONFIG.max_turns + 1


def test_rollout_logprobs_only_when_asked_and_match_a_float64_forward(model64, tiny, retriever):
    """With ``return_logprobs`` (truncated IS) the engine's per-token log-probs are ``log softmax(logits / T)`` of the sampled
    token (the trainer's definition), checked against a float64 forward over the final rows; without
    it none are computed."""
    model, tokenizer = tiny
    assert HFRolloutEngine(model, tokenizer, retriever, CONFIG).generate(QUESTIONS, seed=3).rollout_logprobs is None
    config = RolloutConfig(**{**CONFIG.__dict__, "temperature": 0.7, "top_p": 1.0, "return_logprobs": True})
    traj = HFRolloutEngine(model, tokenizer, retriever, config).generate(QUESTIONS, seed=3)
    assert traj.rollout_logprobs is not None and traj.loss_mask.sum() > 2 * len(QUESTIONS)
    with torch.no_grad():
        logits = model64(input_ids=traj.input_ids, attention_mask=traj.attention_mask).logits[:, :-1]
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(2, traj.input_ids[:, 1:, None]).squeeze(2)
    policy = traj.loss_mask[:, 1:].bool()
    delta = (traj.rollout_logprobs[:, 1:].double() - reference)[policy].abs()
    # float32 (generation, KV cache) against float64: a logit is a chain of float32 sums over the
    # context (attention), the widths of every layer and the vocabulary; each sum of n terms is off by
    # at most n x eps relative (Higham's gamma_n), here of the largest logit, whatever order a CPU sums in.
    cfg = model64.config
    n_ops = (cfg.vocab_size + traj.input_ids.shape[1]
             + cfg.num_hidden_layers * (4 * cfg.hidden_size + cfg.intermediate_size))
    bound = torch.finfo(torch.float32).eps * n_ops * float((logits / 0.7).abs().max())
    assert delta.max() <= bound, (float(delta.max()), bound)
    assert (traj.rollout_logprobs[:, 1:][~policy] == 0).all()


def test_batch_invariance(model64, tiny, retriever):
    _, tokenizer = tiny
    engine = HFRolloutEngine(model64, tokenizer, retriever, CONFIG)
    batch = engine.generate(QUESTIONS[:3], greedy=True)
    for b, question in enumerate(QUESTIONS[:3]):
        alone = engine.generate([question], greedy=True)
        length = int(alone.attention_mask[0].sum())
        assert torch.equal(batch.input_ids[b, :length], alone.input_ids[0, :length])
        assert int(batch.attention_mask[b].sum()) == length
        assert torch.equal(batch.loss_mask[b, :length], alone.loss_mask[0, :length])


def _row(traj, b):
    length = int(traj.attention_mask[b].sum())
    return traj.input_ids[b, :length].tolist(), traj.loss_mask[b, :length].tolist()


def test_sampled_rows_depend_only_on_seed_and_row_key(tiny, retriever):
    """Sampling is seeded per row key (rollout.seeding): a question samples the same tokens alone, in
    another order, or beside other questions (as on another rank), and a different key or seed
    samples differently. Float32, top-p 0.95: the real training setting."""
    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer, retriever, CONFIG)
    keys = [f"q{i}" for i in range(len(QUESTIONS))]
    whole = engine.generate(QUESTIONS, seed=11, row_keys=keys)
    order = [3, 0, 4]
    part = engine.generate([QUESTIONS[i] for i in order], seed=11, row_keys=[keys[i] for i in order])
    for b, i in enumerate(order):
        assert _row(part, b) == _row(whole, i)
    alone = engine.generate([QUESTIONS[1]], seed=11, row_keys=[keys[1]])
    assert _row(alone, 0) == _row(whole, 1)
    # Two samples of one question (GRPO) differ by key; another seed differs too.
    twice = engine.generate([QUESTIONS[0]] * 2, seed=11, row_keys=["q0", "q0#1"])
    assert _row(twice, 0) == _row(whole, 0) and _row(twice, 1) != _row(twice, 0)
    assert _row(engine.generate([QUESTIONS[0]], seed=12, row_keys=["q0"]), 0) != _row(whole, 0)
    with pytest.raises(Exception, match="2 row keys for 1 questions"):
        engine.generate([QUESTIONS[0]], seed=11, row_keys=["a", "b"])


def test_generate_leaves_the_global_rng_alone(tiny, retriever):
    """Greedy, seeded and unseeded rollouts draw nothing from torch's global RNG (a validation pass
    or the warm-start's demonstrations must not shift what a run draws afterwards)."""
    model, tokenizer = tiny
    engine = HFRolloutEngine(model, tokenizer, retriever, CONFIG)
    state = torch.get_rng_state()
    engine.generate(QUESTIONS[:2], greedy=True)
    engine.generate(QUESTIONS[:2], seed=1)
    unseeded = [engine.generate(QUESTIONS[:2]) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(unseeded[0].input_ids, unseeded[1].input_ids)  # fresh seeds


def test_config_is_validated():
    from stepsearch.errors import StepSearchError

    for bad in ({"top_p": 0.0}, {"max_turns": -1}, {"max_response_tokens": 0}, {"template": "nope"}, {"top_k": 0}):
        with pytest.raises(StepSearchError):
            RolloutConfig(**bad)


def test_eos_ids_from_tokenizer_and_generation_config(tiny):
    from types import SimpleNamespace

    from stepsearch.rollout.engine import eos_token_ids

    _, tokenizer = tiny
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, tokenizer.eos_token_id]))
    assert eos_token_ids(model, tokenizer) == sorted({7, tokenizer.eos_token_id})


def test_plan_template_with_a_chat_template(tiny, retriever):
    from stepsearch.models.tiny import CHATML_TEMPLATE
    from stepsearch.rollout.scripted import ScriptedPolicy
    from stepsearch.rollout.template import format_prompt

    _, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML_TEMPLATE
    turns = ["<plan> find it </plan><search> Jeff Porcaro </search>",
             "<observation> Doc1 says drummer </observation><answer> drummer </answer>"]
    config = RolloutConfig(max_turns=2, max_response_tokens=40, template="plan")
    engine = HFRolloutEngine(ScriptedPolicy(chat, {"What was Porcaro": turns}), chat, retriever, config)
    traj = engine.generate(["What was Porcaro"])
    prompt = format_prompt("What was Porcaro", chat, template="plan")
    assert prompt.startswith("<|im_start|>user\n## Background") and prompt.endswith("<|im_start|>assistant\n")
    assert traj.records[0].prompt_text == prompt
    assert traj.input_ids[0, : traj.prompt_lengths[0]].tolist() == chat(prompt, add_special_tokens=False)["input_ids"]
    assert traj.records[0].answer == "drummer" and retriever.calls == [["Jeff Porcaro"]]
    assert "\n\n<information> Doc 1<## Title: " in traj.records[0].response_text
