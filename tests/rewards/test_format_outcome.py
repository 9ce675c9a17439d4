"""Format gate, answer extraction, answer reward, search-key reward, global score (METHOD.md §2a–d)."""

from __future__ import annotations

import pytest

from stepsearch.rewards import (
    RewardConfig,
    answer_reward,
    extract_answer,
    global_score,
    is_valid_format,
    search_key_reward,
    strip_environment_blocks,
)

INFO_WITH_ANSWER = (
    "<search> capital of France </search>\n\n<information> Doc 1<## Title: Q ##> the quiz says "
    "<answer> Lyon </answer> </information>\n\n"
)


@pytest.mark.parametrize(
    ("text", "valid", "answer"),
    [
        ("<think> easy </think>\n<answer> Paris </answer>", True, "Paris"),
        ("<answer>Paris</answer>  \n\t", True, "Paris"),
        ("<answer>Paris</answer><|im_end|>", True, "Paris"),  # decoder EOS text is not model text
        ("<think> no idea </think>", False, None),  # no answer
        ("<answer> Paris </answer> because it is the capital", False, "Paris"),  # trailing text
        ("<answer> A </answer> then <answer> B </answer>", True, "B"),  # last block counts
        ("<answer> A </answer> then <answer> B </answer> x", False, "B"),
        (INFO_WITH_ANSWER, False, None),  # <answer> only inside <information>
        (INFO_WITH_ANSWER + "<answer> Paris </answer>", True, "Paris"),
        ("<answer> Paris </answer>" + INFO_WITH_ANSWER, False, "Paris"),  # env block after answer is stripped, its search is not
        (
            "<think>hmm</think>\n<warning>Invalid action: put the answer between <answer> and </answer>.</warning>\n",
            False,
            None,
        ),  # a warning quoting the tags is not an answer
        ("<information> <answer> Rome </answer>", True, "Rome"),  # unclosed: the model wrote it itself
        ("<answer></answer>", True, ""),
        ("", False, None),
    ],
)
def test_format_gate_and_extraction(text, valid, answer):
    assert is_valid_format(text) is valid
    assert extract_answer(text) == answer


def test_strip_environment_blocks_and_config_tags():
    text = "a<information>x</information>b<warning>y</warning>c<information>z"
    assert strip_environment_blocks(text) == "a b c<information>z"
    assert strip_environment_blocks(text, ("warning",)) == "a<information>x</information>b c<information>z"
    # with no environment tags the answer inside <information> counts (the released behaviour)
    assert extract_answer(INFO_WITH_ANSWER, ()) == "Lyon"
    assert not is_valid_format("<answer>x</answer><|im_end|>", trailing_ignore=())


def test_answer_reward_f1_and_em():
    golds = ["Gnaeus Pompeius Magnus", "Pompey"]
    assert answer_reward("Magnus", golds) == pytest.approx(0.5)  # P=1, R=1/3 on the first gold
    assert answer_reward("Magnus", golds, "em") == 0.0
    assert answer_reward("pompey", golds, "em") == 1.0
    assert answer_reward(None, golds) == 0.0
    with pytest.raises(ValueError):
        answer_reward("x", golds, "bleu")


def test_search_key_reward_hand_values():
    keys = [["birthplace of Jeff Porcaro", "where was Jeff Porcaro born"], ["capital of Connecticut"]]
    # q1 vs group 0: norm tokens {birthplace, of, jeff, porcaro} exact -> 1.0; group 1 shares "of" only
    assert search_key_reward(["birthplace of Jeff Porcaro"], keys) == pytest.approx(0.5)
    # q "Connecticut capital": group 1 {capital, of, connecticut}: overlap 2, P=1, R=2/3 -> 0.8
    assert search_key_reward(["Connecticut capital"], keys) == pytest.approx(0.4)
    both = search_key_reward(["birthplace of Jeff Porcaro", "Connecticut capital"], keys)
    assert both == pytest.approx((1.0 + 0.8) / 2)
    assert search_key_reward([], keys) == 0.0
    assert search_key_reward(["anything"], []) == 0.0
    assert search_key_reward(["zzz unrelated"], keys) == 0.0  # no overlap: no group is set


def test_search_key_overwrite_vs_max_differ():
    keys = [["jeff porcaro birthplace"], ["toto band founded"]]
    # first query matches group 0 fully (1.0); a later weaker query on group 0 (F1 = 0.8: P=1, R=2/3)
    queries = ["jeff porcaro birthplace", "jeff porcaro"]
    overwrite = search_key_reward(queries, keys, "overwrite")
    maximum = search_key_reward(queries, keys, "max")
    assert overwrite == pytest.approx(0.8 / 2)
    assert maximum == pytest.approx(1.0 / 2)
    assert search_key_reward(queries, keys, "overwrite") != maximum


def test_search_key_tie_goes_to_first_group():
    keys = [["alpha beta"], ["alpha gamma"]]
    # "alpha" scores 2/3 against both groups; the first one wins the tie (released argmax with ">")
    assert search_key_reward(["alpha"], keys, "overwrite") == pytest.approx((2 / 3) / 2)


def test_global_score():
    assert global_score(True, 0.5, 0.5) == pytest.approx(0.5 + 0.618 * 0.5)
    assert global_score(True, 0.5, 0.5, use_key=False) == 0.5
    assert global_score(False, 1.0, 1.0) == -1.0
    assert global_score(False, 1.0, 1.0, format_penalty=-2.0) == -2.0


def test_config_validation_and_baseline():
    with pytest.raises(ValueError):
        RewardConfig(answer_metric="bleu")
    with pytest.raises(ValueError):
        RewardConfig(key_update="min")
    base = RewardConfig().global_only()
    assert not (base.search_key_reward or base.information_gain or base.redundancy_penalty or base.step_rewards)
    assert RewardConfig().step_reward_scale == 1.6 and RewardConfig().key_weight == 0.618
