"""Prompt templates, action parsing, answer extraction and observation formatting."""

from __future__ import annotations

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.base import Passage
from stepsearch.rollout import template as tpl


def test_prompt_question_normalised_and_placed_last():
    prompt = tpl.format_prompt("  who founded Toto  ")
    assert prompt.endswith("Question: who founded Toto?\n")
    assert tpl.format_prompt("Who founded Toto?").endswith("Question: Who founded Toto?\n")  # no second '?'
    assert "<think> and </think>" in prompt and "<search> query </search>" in prompt
    assert "<information> and </information>" in prompt and "<answer> Beijing </answer>" in prompt


def test_plan_template_is_the_released_prompt():
    prompt = tpl.format_prompt("x", template="plan")
    assert prompt.startswith("## Background\nYou are a deep AI research assistant with search tool\n")
    assert "<plan> and </plan>" in prompt and "<observation> and </observation>" in prompt
    assert prompt.endswith(" Question: x?\n")
    with pytest.raises(StepSearchError, match="unknown template"):
        tpl.format_prompt("x", template="nope")


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_template_used_only_when_present_and_allowed():
    chat = _ChatTokenizer()
    raw = tpl.format_prompt("q", None)
    assert tpl.format_prompt("q", chat) == f"<user>{raw}</user><assistant>"
    assert tpl.format_prompt("q", chat, use_chat_template=False) == raw

    class _Plain:
        chat_template = None

    assert tpl.format_prompt("q", _Plain()) == raw
    with pytest.raises(StepSearchError, match="no chat template"):
        tpl.format_prompt("q", _Plain(), use_chat_template=True)


@pytest.mark.parametrize(
    ("text", "kind", "content", "invalid"),
    [
        ("<think> a </think><search>  Toto drummer </search> tail", "search", "Toto drummer", None),
        ("<think>x</think>\n<answer> Jeff Porcaro </answer>", "answer", "Jeff Porcaro", None),
        # The first complete pair wins, whatever comes after it.
        ("<answer> A </answer><search> q </search>", "answer", "A", None),
        ("<search> q1 </search><answer> A </answer>", "search", "q1", None),
        ("<search>\n</search>", "search", "", "empty_query"),
        ("I think the answer is Toto.", None, "", "no_action"),
        ("<search> Toto drummer", None, "", "unclosed_tag"),
        ("<answer> Toto </search>", None, "", "unclosed_tag"),
        ("", None, "", "no_action"),
    ],
)
def test_parse_action(text, kind, content, invalid):
    action = tpl.parse_action(text)
    assert (action.kind, action.content, action.invalid) == (kind, content, invalid)
    if kind is None:
        assert action.end == -1
    else:
        assert text[: action.end].endswith(f"</{kind}>")
        assert f"</{kind}>" not in text[: action.end - 1]


def test_extract_answer_takes_the_last_block():
    assert tpl.extract_answer("<answer> a </answer> x <answer>\n b c \n</answer>") == "b c"
    assert tpl.extract_answer("<answer></answer>") == ""
    assert tpl.extract_answer("no answer <answer> open") is None


def test_format_observation_exact():
    # StepSearch's released client writes each document as `Doc k<## Title: "TITLE" ##> text` from the
    # service's contents `"TITLE"\ntext` (the quotes are the first line's), joins them with newlines
    # and strips the block; written out here by hand, not produced by the code under test.
    passages = [Passage("1", "Toto (band)", "Toto is a band.", 2.0), Passage("7", "Jeff Porcaro", "A drummer.")]
    expected = (
        '\n\n<information> Doc 1<## Title: "Toto (band)" ##> Toto is a band.\n'
        'Doc 2<## Title: "Jeff Porcaro" ##> A drummer. </information>\n\n'
    )
    assert tpl.format_observation(passages) == expected
    # The released plan prompt also returns results inside <information>.
    assert tpl.format_observation(passages, template="plan") == expected
    head, tail = tpl.observation_parts()
    assert expected.startswith(head) and expected.endswith(tail)
    assert tpl.format_observation([]) == "\n\n<information>  </information>\n\n"  # released: '' stripped


def test_search_r1_observation_format_exact():
    passages = [Passage("1", "Toto (band)", "Toto is a band.", 2.0), Passage("7", "Jeff Porcaro", "A drummer.")]
    expected = (
        '\n\n<information>Doc 1(Title: "Toto (band)") Toto is a band.\n'
        'Doc 2(Title: "Jeff Porcaro") A drummer.</information>\n\n'
    )
    assert tpl.format_observation(passages, observation_format="search-r1") == expected
    head, tail = tpl.observation_parts("think", "search-r1")
    assert (head, tail) == ("\n\n<information>", "</information>\n\n")
    # A passage with an empty body: the released clients strip the joined block, so no trailing space.
    assert tpl.format_documents([Passage("2", "T", "")]) == 'Doc 1<## Title: "T" ##>'
    with pytest.raises(StepSearchError, match="unknown observation_format 'plain': choose one of"):
        tpl.format_observation(passages, observation_format="plain")


def test_environment_notices_hold_no_tag_pairs():
    # A notice must never read as an action or an answer when the response text is scanned.
    for notice in (tpl.INVALID_ACTION_WARNING, tpl.LAST_TURN_WARNING):
        wrapped = tpl.format_warning(notice)
        assert wrapped == f"\n\n<warning> {notice} </warning>\n\n"
        assert tpl.parse_action(wrapped).kind is None
        assert tpl.extract_answer(wrapped + "<answer> x </answer>") == "x"
