"""The scripted policy on its own: one-hot logits, turn by turn, any batch layout."""

from __future__ import annotations

import pytest
import torch

from stepsearch.rollout.scripted import ScriptedPolicy
from stepsearch.rollout.template import format_prompt


def _prompt_ids(tokenizer, question):
    return tokenizer(format_prompt(question), add_special_tokens=False)["input_ids"]


def test_emits_the_script_through_prefill_and_decode(tiny):
    _, tokenizer = tiny
    policy = ScriptedPolicy(tokenizer, {"a": ["<search> q </search>", "<answer> b </answer>"]}, eos_after_last=True)
    turn0 = tokenizer("<search> q </search>", add_special_tokens=False)["input_ids"]
    turn1 = tokenizer("<answer> b </answer>", add_special_tokens=False)["input_ids"]
    prompt = _prompt_ids(tokenizer, "a")
    # Left padding in the batch does not matter; logits are one-hot on the next scripted token.
    ids = torch.tensor([[tokenizer.pad_token_id] * 3 + prompt])
    mask = torch.tensor([[0] * 3 + [1] * len(prompt)])
    out = policy(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert out.logits.shape == (1, 1, len(tokenizer))
    assert out.logits.softmax(-1)[0, -1, turn0[0]] == 1.0
    emitted, cache = [], out.cache
    token = turn0[0]
    for _ in range(len(turn0) - 1):
        emitted.append(token)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        out = policy(input_ids=torch.tensor([[token]]), attention_mask=mask, cache=cache, logits_to_keep=1)
        token, cache = int(out.logits[0, -1].argmax()), out.cache
    emitted.append(token)
    assert emitted == turn0
    # A fresh prefill of prompt + turn 0 + an observation starts turn 1 (the engine re-prefills each turn).
    observation = tokenizer("\n\n<information> Doc 1 </information>\n\n", add_special_tokens=False)["input_ids"]
    full = torch.tensor([prompt + turn0 + observation])
    out = policy(input_ids=full, logits_to_keep=1)
    assert int(out.logits[0, -1].argmax()) == turn1[0]
    # Without logits_to_keep every position gets logits: each one predicts the token that follows.
    out = policy(input_ids=full)
    assert torch.equal(out.logits[0, :-1].argmax(-1), full[0, 1:])


def test_unknown_question_is_a_clear_error(tiny):
    _, tokenizer = tiny
    policy = ScriptedPolicy(tokenizer, [("known question", ["<answer> a </answer>"])])
    with pytest.raises(ValueError, match="none of its 1 questions"):
        policy(input_ids=torch.tensor([_prompt_ids(tokenizer, "something else")]))


def test_cache_rows_can_be_selected(tiny):
    _, tokenizer = tiny
    scripts = {"one": ["<answer> 1 </answer>"], "two": ["<answer> 22 </answer>"]}
    policy = ScriptedPolicy(tokenizer, scripts)
    prompts = [_prompt_ids(tokenizer, q) for q in scripts]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([[width - len(p)] for p in prompts])).long()
    out = policy(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    out.cache.batch_select_indices(torch.tensor([1]))  # drop row 0, keep row "two"
    mask = torch.cat([mask[1:], torch.ones(1, 1, dtype=torch.long)], dim=1)
    out = policy(input_ids=first[1:, None], attention_mask=mask, cache=out.cache, logits_to_keep=1)
    expected = tokenizer("<answer> 22 </answer>", add_special_tokens=False)["input_ids"][1]
    assert int(out.logits[0, -1].argmax()) == expected


def test_memo_stays_small(tiny, retriever):
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.engine import RolloutConfig

    _, tokenizer = tiny
    long_turn = "<think> long " + "word " * 30 + "</think><answer> a </answer>"
    scripts = {f"question {i}": ["<search> Toto </search>", long_turn] for i in range(3)}
    policy = ScriptedPolicy(tokenizer, scripts)
    traj = HFRolloutEngine(policy, tokenizer, retriever, RolloutConfig(max_turns=2)).generate(list(scripts))
    assert all(r.answer == "a" for r in traj.records)
    assert int(traj.loss_mask.sum()) > 100
    assert len(policy._memo) <= 3 * 2  # one entry per row and turn, not one per token
