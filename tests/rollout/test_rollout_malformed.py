"""Malformed policy output is normal: every case yields a trajectory with the invalid action recorded."""

from __future__ import annotations

from stepsearch.rollout import template as tpl
from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.engine import RolloutConfig
from stepsearch.rollout.scripted import ScriptedPolicy


def _run(tokenizer, retriever, scripts, **config):
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, scripts), tokenizer, retriever, RolloutConfig(**config))
    return engine.generate(list(scripts), seed=0)


def _segments(traj, b):
    """(policy?, ids) runs of the response of row ``b``, split where the loss mask changes."""
    start, end = int(traj.prompt_lengths[b]), int(traj.attention_mask[b].sum())
    ids, mask = traj.input_ids[b, start:end].tolist(), traj.loss_mask[b, start:end].tolist()
    runs: list[tuple[bool, list[int]]] = []
    for token, m in zip(ids, mask):
        if runs and runs[-1][0] == bool(m):
            runs[-1][1].append(token)
        else:
            runs.append((bool(m), [token]))
    return runs


def _text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_malformed_turns_are_recorded_and_the_trajectory_goes_on(tiny, retriever):
    _, tokenizer = tiny
    limit = 40
    scripts = {
        "no tags then an answer": ["I am not sure about this one.", "<answer> Toto </answer>"],
        "unclosed search": ["<search> Toto band", "<answer> x </answer>"],
        "empty query": ["<search>   </search>", "<search> Jeff Porcaro </search>", "<answer> y </answer>"],
        "immediate eos": [],
    }
    traj = _run(tokenizer, retriever, scripts, max_turns=3, max_response_tokens=limit, top_k=1)
    eos = tokenizer.eos_token_id
    filler = tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    warning = tpl.format_warning(tpl.INVALID_ACTION_WARNING)

    # No tags: the turn runs to the token limit (the script pads with filler), a warning follows.
    runs = _segments(traj, 0)
    first = tokenizer(scripts["no tags then an answer"][0], add_special_tokens=False)["input_ids"]
    assert runs[0] == (True, first + [filler] * (limit - len(first)))
    assert runs[1][0] is False and _text(tokenizer, runs[1][1]) == warning
    assert _text(tokenizer, runs[2][1]) == "<answer> Toto </answer>" and len(runs) == 3
    record = traj.records[0]
    assert record.invalid_actions == ["no_action", "answer_without_search"]
    assert record.finished and record.answer == "Toto" and record.num_turns == 2 and not record.steps

    assert traj.records[1].invalid_actions == ["unclosed_tag", "answer_without_search"]
    assert traj.records[1].answer == "x"

    record = traj.records[2]
    assert record.invalid_actions == ["empty_query"]
    assert [s.query for s in record.steps] == ["Jeff Porcaro"] and record.answer == "y"
    runs = _segments(traj, 2)
    assert _text(tokenizer, runs[1][1]) == warning
    assert _text(tokenizer, runs[3][1]).startswith("\n\n<information> Doc 1<## Title: ")

    record = traj.records[3]
    assert _segments(traj, 3) == [(True, [eos])]
    assert record.invalid_actions == ["no_action"] and record.finished and record.answer is None

    # Only well-formed, non-empty queries reach the retriever.
    assert retriever.calls == [["Jeff Porcaro"]]


def test_search_on_the_last_turn(tiny, retriever):
    _, tokenizer = tiny
    scripts = {"search twice": ["<search> Toto band </search>", "<search> again </search>"]}
    traj = _run(tokenizer, retriever, scripts, max_turns=1, top_k=2)
    record = traj.records[0]
    assert record.invalid_actions == ["search_on_last_turn"]
    assert not record.finished and record.answer is None and record.num_turns == 2
    assert retriever.calls == [["Toto band"]] and len(record.steps) == 1
    runs = _segments(traj, 0)
    env = _text(tokenizer, runs[1][1])
    # The last turn's observation carries the no-more-searches warning.
    assert env.startswith("\n\n<information> Doc 1") and env.endswith(
        f"</information>\n\n<warning> {tpl.LAST_TURN_WARNING} </warning>\n\n")
    assert _text(tokenizer, runs[2][1]) == "<search> again </search>" and len(runs) == 3


def test_no_search_budget_and_unfinished_text(tiny, retriever):
    _, tokenizer = tiny
    # max_turns=0: only the final generation; the script ends without a tag, then EOS.
    traj = _run(tokenizer, retriever, {"just think": ["<think> hmm"]}, max_turns=0)
    record = traj.records[0]
    assert record.invalid_actions == ["no_action"]
    assert record.num_turns == 1 and record.answer is None and retriever.calls == []
    policy = [t for t, m in zip(traj.input_ids[0].tolist(), traj.loss_mask[0].tolist()) if m]
    assert policy == tokenizer("<think> hmm", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_observation_truncated_keeps_its_closing_tag(tiny, retriever):
    _, tokenizer = tiny
    scripts = {"long docs": ["<search> Jeff Porcaro drummer </search>", "<answer> z </answer>"]}
    traj = _run(tokenizer, retriever, scripts, max_turns=2, max_observation_tokens=40, top_k=3)
    runs = _segments(traj, 0)
    assert len(runs[1][1]) == 40
    env = _text(tokenizer, runs[1][1])
    assert env.startswith("\n\n<information> Doc 1<## Title: ") and env.endswith(" </information>\n\n")
    assert traj.records[0].answer == "z" and not traj.records[0].truncated


def test_context_cap_truncates(tiny, retriever):
    _, tokenizer = tiny
    scripts = {"capped": ["<search> Jeff Porcaro drummer </search>", "<answer> never reached </answer>"]}
    prompt_len = len(tokenizer(tpl.format_prompt("capped", tokenizer))["input_ids"])
    cap = prompt_len + 30
    traj = _run(tokenizer, retriever, scripts, max_turns=3, max_context_tokens=cap, top_k=3)
    record = traj.records[0]
    assert record.truncated and not record.finished and record.answer is None
    assert int(traj.attention_mask[0].sum()) == cap == traj.input_ids.shape[1]
    runs = _segments(traj, 0)
    assert [policy for policy, _ in runs] == [True, False]  # cut inside the observation
    assert len(record.steps) == 1


def test_prompt_longer_than_the_cap(tiny, retriever):
    _, tokenizer = tiny
    traj = _run(tokenizer, retriever, {"q": ["<answer> a </answer>"]}, max_context_tokens=10)
    record = traj.records[0]
    assert record.truncated and record.num_turns == 0 and int(traj.loss_mask.sum()) == 0
    assert traj.last_token_index[0] == traj.prompt_lengths[0] - 1
