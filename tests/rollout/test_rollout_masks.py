"""Exact token layout and masks of the engine, driven by a scripted policy and a real BM25 index.

The expected rows are rebuilt here from the scripts: the prompt tokenized on its own, each policy
turn's ids exactly as the tokenizer gives them for the turn text, and each environment segment
checked by its decoded text (found without looking at the masks).
"""

from __future__ import annotations

import pytest
import torch

from stepsearch.rollout import template as tpl
from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.engine import RolloutConfig
from stepsearch.rollout.scripted import ScriptedPolicy

SCRIPTS = {
    "Who was the drummer of Toto": [
        "<think> I need the band first. </think><search> Toto rock band drummer </search>",
        "<think> Now the drummer. </think><search> Jeff Porcaro </search>",
        "<think> Done. </think><answer> Jeff Porcaro </answer>",
    ],
    "Which album made Porcaro known?": [
        "<think> search </think><search> Porcaro Steely Dan album </search>",
        "<answer> Katy Lied </answer>",
    ],
    "What is 2+2": ["<think> I know this. </think><answer> 4 </answer>"],
    "Where was Manchester Orchestra formed": [
        "<search> Manchester Orchestra </search>",
        "<search> Atlanta Georgia </search>",
        "<search> indie rock band 2004 </search>",
        "<answer> Atlanta </answer>",
    ],
}
CONFIG = RolloutConfig(max_turns=3, max_response_tokens=64, max_observation_tokens=4000,
                       max_context_tokens=4096, top_k=2)


def _env_text(kind: str, passages, last_turn: bool) -> str:
    text = tpl.format_observation(passages) if kind == "search" else tpl.format_warning(tpl.INVALID_ACTION_WARNING)
    if last_turn:
        text += tpl.format_warning(tpl.LAST_TURN_WARNING).lstrip("\n")
    return text


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_row(traj, b, tokenizer, question, turns, max_turns):
    """Walk row ``b`` against the script; return the policy text seen. Checks ids, masks, steps."""
    ids = traj.input_ids[b].tolist()
    mask = traj.loss_mask[b].tolist()
    attention = traj.attention_mask[b].tolist()
    record = traj.records[b]
    prompt = tokenizer(tpl.format_prompt(question, tokenizer), add_special_tokens=True)["input_ids"]
    assert traj.prompt_lengths[b] == len(prompt) and ids[: len(prompt)] == prompt
    assert mask[: len(prompt)] == [0] * len(prompt)
    position, step = len(prompt), 0
    for turn_index, text in enumerate(turns):
        turn_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[position: position + len(turn_ids)] == turn_ids, f"row {b} turn {turn_index}"
        assert mask[position: position + len(turn_ids)] == [1] * len(turn_ids)
        position += len(turn_ids)
        action = tpl.parse_action(text)
        if action.kind != "search" or turn_index == max_turns:
            continue
        # A search: the step points at the last token of `</search>`, then the observation follows.
        recorded = record.steps[step]
        assert recorded.query == action.content and recorded.end_index == position - 1
        assert _decode(tokenizer, [ids[position - 1]]) == "</search>"
        env = _env_text("search", _passages(recorded), last_turn=turn_index == max_turns - 1)
        length = next(n for n in range(1, len(ids) - position + 1)
                      if _decode(tokenizer, ids[position: position + n]) == env)
        assert mask[position: position + length] == [0] * length
        position += length
        step += 1
    assert step == len(record.steps)
    assert attention == [1] * position + [0] * (len(ids) - position)
    assert mask[position:] == [0] * (len(ids) - position)
    return _decode(tokenizer, [i for i, m in zip(ids, mask) if m])


def _passages(step):
    from stepsearch.retrieval.base import Passage

    return [Passage(i, t, x) for i, t, x in zip(step.passage_ids, step.passage_titles, step.passage_texts)]


def test_scripted_masks_steps_and_retrieval_calls(tiny, retriever, bm25):
    _, tokenizer = tiny
    policy = ScriptedPolicy(tokenizer, SCRIPTS)
    engine = HFRolloutEngine(policy, tokenizer, retriever, CONFIG)
    questions = list(SCRIPTS)
    traj = engine.generate(questions, seed=3)

    assert traj.input_ids.shape == traj.loss_mask.shape == traj.attention_mask.shape
    for b, (question, turns) in enumerate(SCRIPTS.items()):
        policy_text = check_row(traj, b, tokenizer, question, turns, CONFIG.max_turns)
        assert policy_text == "".join(turns)  # the masked-in tokens are exactly what the policy wrote
        record = traj.records[b]
        assert record.num_turns == len(turns) and record.finished
        assert record.answer == tpl.extract_answer(turns[-1])
    # One batched retriever call per turn, holding every active search of that turn, in row order.
    expected_calls = []
    for turn in range(CONFIG.max_turns):
        queries = [tpl.parse_action(t[turn]).content for t in SCRIPTS.values()
                   if turn < len(t) and tpl.parse_action(t[turn]).kind == "search"]
        if queries:
            expected_calls.append(queries)
    assert retriever.calls == expected_calls
    # The recorded passages are what the BM25 index returns for that query.
    for record in traj.records:
        for step in record.steps:
            assert step.passage_ids == [p.id for p in bm25.search([step.query], CONFIG.top_k)[0]]
    assert traj.records[2].invalid_actions == ["answer_without_search"]
    assert traj.timing["tokens_generated"] == int(traj.loss_mask.sum())
    assert traj.timing["retrieval_calls"] == len(expected_calls)
    # The global reward's position: the last policy token (`</answer>`) of each row.
    for b in range(len(traj)):
        assert _decode(tokenizer, [traj.input_ids[b, traj.last_token_index[b]].item()]) == "</answer>"


def test_duplicates_and_greedy_give_the_same_rows(tiny, retriever):
    _, tokenizer = tiny
    questions = ["What is 2+2", "Which album made Porcaro known?", "What is 2+2", "Which album made Porcaro known?"]
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, SCRIPTS), tokenizer, retriever, CONFIG)
    traj = engine.generate(questions, greedy=True)
    assert torch.equal(traj.input_ids[0], traj.input_ids[2]) and torch.equal(traj.input_ids[1], traj.input_ids[3])
    assert retriever.calls == [["Porcaro Steely Dan album"] * 2]


def test_multitoken_tags_stop_by_text(multitoken_tokenizer, retriever):
    tokenizer = multitoken_tokenizer
    assert len(tokenizer("</search>", add_special_tokens=False)["input_ids"]) > 1
    scripts = {q: SCRIPTS[q] for q in list(SCRIPTS)[:2]}
    # Trailing text after the closing tag is never generated: the turn stops at the tag.
    extended = {q: [t + " trailing words" for t in turns] for q, turns in scripts.items()}
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, extended), tokenizer, retriever, CONFIG)
    traj = engine.generate(list(scripts), seed=0)
    for b, turns in enumerate(scripts.values()):
        record = traj.records[b]
        policy = [i for i, m in zip(traj.input_ids[b].tolist(), traj.loss_mask[b].tolist()) if m]
        # Each turn is cut right after its tag: the policy wrote exactly the scripted text up to it.
        assert _decode(tokenizer, policy) == "".join(turns)
        assert record.answer == tpl.extract_answer(turns[-1]) and record.finished
        ids = traj.input_ids[b].tolist()
        assert len(record.steps) == sum(tpl.parse_action(t).kind == "search" for t in turns)
        for step in record.steps:
            assert _decode(tokenizer, ids[: step.end_index + 1]).endswith("</search>")
            assert not _decode(tokenizer, ids[: step.end_index]).endswith("</search>")
    assert retriever.calls[0] == [tpl.parse_action(t[0]).content for t in scripts.values()]


@pytest.mark.parametrize("training", [True, False])
def test_engine_restores_the_train_mode(tiny, retriever, training):
    model, tokenizer = tiny
    policy = ScriptedPolicy(tokenizer, SCRIPTS, base_model=model)
    policy.train(training)
    seen = []
    original = policy.forward

    def spy(*args, **kwargs):
        seen.append((policy.training, model.training, torch.is_grad_enabled()))
        return original(*args, **kwargs)

    policy.forward = spy
    HFRolloutEngine(policy, tokenizer, retriever, CONFIG).generate(["What is 2+2"])
    assert seen and all(s == (False, False, False) for s in seen)
    assert policy.training is training and model.training is training
    model.eval()


def test_end_to_end_real_model_cache_and_bm25(tiny, retriever):
    """The scripted policy drives the real tiny Qwen2 (its KV cache goes through the engine) on a batch
    of 5 with real BM25: rows of different lengths, 1 to 4 turns, one retriever call per turn."""
    model, tokenizer = tiny
    policy = ScriptedPolicy(tokenizer, SCRIPTS, base_model=model)
    engine = HFRolloutEngine(policy, tokenizer, retriever, CONFIG)
    questions = list(SCRIPTS) + ["Who was the drummer of Toto"]
    traj = engine.generate(questions, seed=11)
    for b, question in enumerate(questions):
        turns = SCRIPTS[question]
        assert check_row(traj, b, tokenizer, question, turns, CONFIG.max_turns) == "".join(turns)
    assert retriever.calls == [
        ["Toto rock band drummer", "Porcaro Steely Dan album", "Manchester Orchestra", "Toto rock band drummer"],
        ["Jeff Porcaro", "Atlanta Georgia", "Jeff Porcaro"],
        ["indie rock band 2004"],
    ]
    assert traj.timing["turns"] == 4 and traj.timing["generation_s"] > 0 and traj.timing["retrieval_s"] > 0
