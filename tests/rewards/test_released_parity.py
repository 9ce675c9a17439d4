"""Rewards beside the released StepSearch scorer (``qa_step.py`` @43215ba): the documented departures,
as hand-computed cases (docs/method.md, "Departures from the released code").

Case of item 1: two searches return [A, B, C] then [B, D, E]; the golden passage is A. The released
scorer reads the passages back out of the response and keeps ``"\\nDoc k+1"`` on all but the last of
each search: A is read as ``"A\\nDoc 2"``, whose normalised tokens are A's five plus ``doc`` (``2`` is
one character: no token). TF-IDF fitted on {d, A} (N = 2): shared tokens get idf ln(3/3) + 1 = 1,
``doc`` gets ln(3/2) + 1, so cos = 5 / (√(5 + (1 + ln 1.5)²) · √5) = 0.846648. B is read as
``"B\\nDoc 3"`` in the first search and ``"B\\nDoc 2"`` in the second: different texts, no repeat.
"""

from __future__ import annotations

import math

import pytest

from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.errors import ConfigError
from stepsearch.retrieval.base import Passage
from stepsearch.rewards import RewardConfig, global_score, search_key_reward
from stepsearch.rewards.information import passages_from_response
from stepsearch.rewards.scoring import score_trajectory
from stepsearch.rollout.template import format_observation
from stepsearch.rollout.trajectory import SearchStep, TrajectoryRecord

A = "Toto formed in Los Angeles"  # five tokens after normalisation, none shared with B..E
B = "Jeff Porcaro played drums"
C = "Steely Dan recorded albums"
D = "Mountrail County North Dakota"
E = "Neil Peart wrote lyrics"
PASSAGES = {"a": Passage("a", "Toto", A), "b": Passage("b", "Jeff Porcaro", B), "c": Passage("c", "Steely Dan", C),
            "d": Passage("d", "Mountrail County", D), "e": Passage("e", "Neil Peart", E)}
RELEASED_GAIN = 5 / (math.sqrt(5 + (1 + math.log(1.5)) ** 2) * math.sqrt(5))


def record_of(searches: list[tuple[str, list[str]]], answer: str = "1977") -> TrajectoryRecord:
    """A trajectory's record as the engine writes it: each search, its observation, then the answer."""
    text, steps = "<think> look it up </think>", []
    for query, ids in searches:
        passages = [PASSAGES[i] for i in ids]
        text += f"<search> {query} </search>" + format_observation(passages)
        steps.append(SearchStep(query, ids, [p.title for p in passages], [p.text for p in passages], end_index=0))
    return TrajectoryRecord("prompt", text + f"<answer> {answer} </answer>", answer, steps)


EXAMPLE = Example("ex", "When was Toto formed?", ["1977"], sub_questions=[
    SubQuestion("When was Toto formed?", "1977", ["Toto formed"], [GoldenPassage("a", "Toto", A)])])


def test_hand_computed_released_gain():
    assert RELEASED_GAIN == pytest.approx(0.846648, abs=1e-6)


def test_response_parsing_keeps_the_stray_doc_suffix():
    record = record_of([("Toto formed", ["a", "b", "c"]), ("Jeff Porcaro", ["b", "d", "e"])])
    assert passages_from_response(record.response_text) == [
        [f"{A}\nDoc 2", f"{B}\nDoc 3", C],
        [f"{B}\nDoc 2", f"{D}\nDoc 3", E],
    ]


def test_passage_source_response_reproduces_the_released_numbers():
    record = record_of([("Toto formed", ["a", "b", "c"]), ("Jeff Porcaro", ["b", "d", "e"])])
    released = score_trajectory(record, EXAMPLE, RewardConfig(passage_source="response"))
    assert released.info_gains == pytest.approx([RELEASED_GAIN, 0.0], abs=1e-12)
    assert released.redundancies == [0.0, 0.0]  # B at another rank is another text: no repeat
    assert released.step_scores == pytest.approx([RELEASED_GAIN, 0.0], abs=1e-12)
    ours = score_trajectory(record, EXAMPLE, RewardConfig())  # passage_source: retrieved (default)
    assert ours.info_gains == pytest.approx([1.0, 0.0], abs=1e-12)
    assert ours.redundancies == pytest.approx([0.0, 1 / 3])
    assert ours.step_scores == pytest.approx([1.0, -1 / 3])
    assert released.global_score == ours.global_score == pytest.approx(1.0 + 0.618)  # outcome unaffected


def test_given_clean_texts_both_sources_agree():
    # One passage per search: nothing follows its body, so the released parse is the clean text.
    record = record_of([("Toto formed", ["a"]), ("Jeff Porcaro", ["b"]), ("Toto", ["a"])])
    released = score_trajectory(record, EXAMPLE, RewardConfig(passage_source="response"))
    ours = score_trajectory(record, EXAMPLE, RewardConfig())
    assert released.info_gains == ours.info_gains == pytest.approx([1.0, 0.0, 0.0])
    assert released.redundancies == ours.redundancies == [0.0, 0.0, 1.0]


def test_failed_format_gate_still_logs_the_key_score():
    # Released: search_key_score 0.0 when the gate fails; ours computes it. R = -1 in both.
    record = record_of([("Toto formed", ["a"])])
    record.response_text += " and more text after the answer"
    score = score_trajectory(record, EXAMPLE, RewardConfig())
    assert (score.format_ok, score.global_score, score.key_score) == (False, -1.0, 1.0)


def test_empty_key_groups_are_dropped_by_example_not_by_the_scorer():
    # keys [["capital of france"], []]: the released scorer averages over both groups, ours over one.
    example = Example("ex", "What is the capital of France?", ["Paris"], sub_questions=[
        SubQuestion("capital of France?", "Paris", ["capital of france"], []),
        SubQuestion("what else?", "", [], [])])
    assert example.search_keys == [["capital of france"]]
    as_given = search_key_reward(["capital of france"], [["capital of france"], []])
    assert as_given == 0.5
    assert global_score(True, 1.0, as_given) == pytest.approx(1.309)  # the released R
    PASSAGES["p"] = Passage("p", "France", "Paris is the capital of France.")
    try:
        record = TrajectoryRecord("prompt", "<search> capital of france </search>" + format_observation(
            [PASSAGES["p"]]) + "<answer> Paris </answer>", "Paris",
            [SearchStep("capital of france", ["p"], ["France"], [PASSAGES["p"].text], end_index=0)])
        assert score_trajectory(record, example, RewardConfig()).global_score == pytest.approx(1.618)
    finally:
        del PASSAGES["p"]


def test_duplicate_golden_ids_count_once():
    golden = GoldenPassage("a", "Toto", A)
    example = Example("ex", "q?", ["1977"], sub_questions=[SubQuestion("q1", "x", ["k"], [golden]),
                                                         SubQuestion("q2", "y", ["k2"], [golden])])
    assert [g.id for g in example.golden_passages] == ["a"]  # the released scorer would average over two


def test_passage_source_is_validated():
    with pytest.raises(ConfigError, match="model.rewards.passage_source must be 'retrieved' or 'response', got 'text'"):
        RewardConfig(passage_source="text")
