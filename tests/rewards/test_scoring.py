"""score_trajectories, summarize_scores and place_rewards on a hand-built batch (§2g, §2h)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.evaluation.metrics import normalize_answer
from stepsearch.rewards import RewardConfig, place_rewards, score_trajectories, summarize_scores
from stepsearch.rollout.trajectory import SearchStep, Trajectory, TrajectoryRecord

G1 = "Jeffrey Thomas Porcaro was an American drummer best known for his work with the rock band Toto."
G2 = "Toto is an American rock band formed in 1977 in Los Angeles."
OTHER = "Steely Dan is an American rock band founded in 1972 by Walter Becker and Donald Fagen."

EXAMPLE = Example(
    id="ex1",
    question="In which year was the band of Jeff Porcaro formed?",
    answers=["1977"],
    sub_questions=[
        SubQuestion("Which band was Jeff Porcaro in?", "Toto", ["Jeff Porcaro band"], [GoldenPassage("g1", "Jeff Porcaro", G1)]),
        SubQuestion("When was Toto formed?", "1977", ["Toto formed year", "when was Toto formed"], [GoldenPassage("g2", "Toto", G2)]),
    ],
)
NO_GOLD = Example(id="ex2", question="q?", answers=["Paris"])


def released_sim(doc: str, golds: list[str]) -> np.ndarray:
    m = TfidfVectorizer().fit_transform([normalize_answer(doc)] + [normalize_answer(g) for g in golds])
    return np.maximum(cosine_similarity(m[0], m[1:]).ravel(), 0.0)


def make_batch():
    # row 0: prompt 0-3 | policy 4-7 (</search> at 7) | env 8-10 | policy 11-14 (</search> at 14) | env 15-16 | policy 17-19
    # row 1: prompt 0-3 | policy 4-6 (</search> at 6) | env 7-8 | policy 9-11 | padding 12-19 (invalid format)
    # row 2: prompt 0-2 | policy 3-9 (answer, no search) | padding
    length = 20
    loss = torch.zeros(3, length, dtype=torch.long)
    attn = torch.zeros(3, length, dtype=torch.long)
    for b, spans in enumerate([[(4, 8), (11, 15), (17, 20)], [(4, 7), (9, 12)], [(3, 10)]]):
        for lo, hi in spans:
            loss[b, lo:hi] = 1
    attn[0, :] = 1
    attn[1, :12] = 1
    attn[2, :10] = 1
    steps0 = [
        SearchStep("Jeff Porcaro band", ["g1", "x1"], ["Jeff Porcaro", "Steely Dan"], [G1, OTHER], end_index=7),
        SearchStep("when was Toto formed", ["g2", "g1"], ["Toto", "Jeff Porcaro"], [G2, G1], end_index=14),
    ]
    text0 = (
        "<think>find the band</think><search> Jeff Porcaro band </search>\n\n<information> Doc 1 ... </information>\n\n"
        "<search> when was Toto formed </search>\n\n<information> Doc 1 ... </information>\n\n<answer> 1977 </answer>"
    )
    steps1 = [SearchStep("Toto", ["g2"], ["Toto"], [G2], end_index=6)]
    text1 = "<search> Toto </search>\n\n<information> ... </information>\n\n<answer> 1977 </answer> I am sure."
    records = [
        TrajectoryRecord("p", text0, "1977", steps0),
        TrajectoryRecord("p", text1, "1977", steps1),
        TrajectoryRecord("p", "<answer> the Paris </answer>", "the Paris", []),
    ]
    traj = Trajectory(
        input_ids=torch.arange(3 * length).reshape(3, length),
        attention_mask=attn,
        loss_mask=loss,
        prompt_lengths=torch.tensor([4, 4, 3]),
        records=records,
    )
    return traj, [EXAMPLE, EXAMPLE, NO_GOLD]


def test_scores_hand_computed():
    traj, examples = make_batch()
    s0, s1, s2 = score_trajectories(traj.records, examples, RewardConfig())

    # row 0: valid; F1 = 1; key groups: q1 == group 0 (1.0), q2 == group 1 phrasing (1.0) -> r_key = 1
    assert s0.format_ok and s0.answer == "1977" and s0.answer_f1 == 1.0 and s0.answer_em == 1.0
    assert s0.key_score == pytest.approx(1.0)
    assert s0.global_score == pytest.approx(1.0 + 0.618)
    c0 = np.maximum(released_sim(G1, [G1, G2]), released_sim(OTHER, [G1, G2]))
    c1 = np.maximum(released_sim(G2, [G1, G2]), released_sim(G1, [G1, G2]))
    ig0 = c0.mean()
    ig1 = np.maximum(c1 - c0, 0).mean()
    assert s0.info_gains == pytest.approx([ig0, ig1], abs=1e-9)
    assert c0[0] == pytest.approx(1.0) and c1[1] == pytest.approx(1.0)
    assert sum(s0.info_gains) == pytest.approx(1.0, abs=1e-9)  # both golden paragraphs fully covered
    assert s0.redundancies == pytest.approx([0.0, 0.5])  # g1 again in step 2
    assert s0.step_scores == pytest.approx([ig0 - 0.0, ig1 - 0.5], abs=1e-9)
    assert s0.num_searches == 2

    # row 1: trailing text -> invalid: -1, no step scores, but answer F1 still logged
    assert not s1.format_ok and s1.global_score == -1.0 and s1.step_scores == []
    assert s1.answer_f1 == 1.0
    # key: "toto" vs group 1 {toto, formed, year}: P=1, R=1/3 -> 0.5; vs {when, was, toto, formed}: 0.4
    assert s1.key_score == pytest.approx(0.5 / 2)

    # row 2: no golden passages, no keys -> no step rewards; EM after normalisation
    assert s2.format_ok and s2.answer_em == 1.0 and s2.global_score == 1.0
    assert s2.info_gains == [] and s2.step_scores == [] and s2.key_score == 0.0


def test_place_rewards_positions_and_scale():
    traj, examples = make_batch()
    config = RewardConfig()
    scores = score_trajectories(traj.records, examples, config)
    placed = place_rewards(scores, traj, config)
    assert placed.shape == (3, 20) and placed.dtype == torch.float32
    expected = torch.zeros(3, 20, dtype=torch.float64)
    expected[0, 7] = 1.6 * scores[0].step_scores[0]
    expected[0, 14] = 1.6 * scores[0].step_scores[1]
    expected[0, 19] = 1.0 + 0.618
    expected[1, 11] = -1.0  # last policy token of the invalid row; no step reward at 6
    expected[2, 9] = 1.0
    torch.testing.assert_close(placed.double(), expected, atol=1e-6, rtol=0)

    intent = RewardConfig(step_reward_scale=0.6)
    placed_06 = place_rewards(score_trajectories(traj.records, examples, intent), traj, intent)
    assert placed_06[0, 7].item() == pytest.approx(0.6 * scores[0].step_scores[0], abs=1e-6)


def test_switches_give_the_ablations():
    traj, examples = make_batch()
    base = RewardConfig().global_only()
    scores = score_trajectories(traj.records, examples, base)
    assert scores[0].global_score == pytest.approx(1.0)  # no key term
    assert scores[0].step_scores == [] and scores[0].info_gains  # IG still logged
    placed = place_rewards(scores, traj, base)
    assert placed[0].nonzero().flatten().tolist() == [19]

    ig_only = RewardConfig(redundancy_penalty=False)
    s0 = score_trajectories(traj.records[:1], examples[:1], ig_only)[0]
    assert s0.step_scores == pytest.approx(s0.info_gains)
    rp_only = RewardConfig(information_gain=False)
    s0 = score_trajectories(traj.records[:1], examples[:1], rp_only)[0]
    assert s0.step_scores == pytest.approx([0.0, -0.5])
    em = RewardConfig(answer_metric="em", search_key_reward=False)
    assert score_trajectories(traj.records[2:], examples[2:], em)[0].global_score == 1.0


def test_summarize_scores():
    traj, examples = make_batch()
    scores = score_trajectories(traj.records, examples, RewardConfig())
    summary = summarize_scores(scores)
    assert set(summary) >= {"reward", "answer_f1", "answer_em", "key_score", "info_gain", "redundancy", "format_ok", "searches"}
    assert summary["reward"] == pytest.approx((1.618 - 1.0 + 1.0) / 3)
    assert summary["format_ok"] == pytest.approx(2 / 3)
    assert summary["searches"] == pytest.approx(1.0)
    assert summary["redundancy"] == pytest.approx((0.0 + 0.5 + 0.0) / 3)
    assert summary["info_gain"] == pytest.approx((1.0 + sum(scores[1].info_gains) + 0.0) / 3, abs=1e-9)
    assert summary["key_score"] == pytest.approx((1.0 + 0.25 + 0.0) / 3)
    assert summarize_scores([])["reward"] == 0.0


def test_dense_option_and_errors():
    traj, examples = make_batch()
    with pytest.raises(ValueError, match="embed"):
        score_trajectories(traj.records, examples, RewardConfig(similarity="dense"))
    with pytest.raises(ValueError):
        score_trajectories(traj.records, examples[:2], RewardConfig())

    vocab = {}

    def embed(texts):  # bag-of-words counts: a deterministic stand-in encoder
        rows = []
        for t in texts:
            for w in normalize_answer(t).split():
                vocab.setdefault(w, len(vocab))
        for t in texts:
            v = np.zeros(64)
            for w in normalize_answer(t).split():
                v[vocab[w] % 64] += 1
            rows.append(v)
        return np.stack(rows)

    s0 = score_trajectories(traj.records[:1], examples[:1], RewardConfig(similarity="dense"), embed=embed)[0]
    assert s0.info_gains[0] > 0 and sum(s0.info_gains) == pytest.approx(1.0, abs=1e-9)  # goldens retrieved verbatim


def test_place_rewards_rejects_bad_positions():
    traj, examples = make_batch()
    config = RewardConfig()
    scores = score_trajectories(traj.records, examples, config)
    traj.records[0].steps[0].end_index = 9  # an environment token
    with pytest.raises(ValueError, match="not a policy token"):
        place_rewards(scores, traj, config)
    traj.records[0].steps[0].end_index = 99
    with pytest.raises(ValueError, match="outside"):
        place_rewards(scores, traj, config)
