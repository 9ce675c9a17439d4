"""Scoring a rollout batch and placing the scores on tokens (METHOD.md §2g, §2h).

Per trajectory: format gate → global score R (or −1); per search step t: s_t = IG_t − RP_t (each
term switchable, ``step_rewards`` the master switch). No step scores when the format is invalid or
the example has no golden paragraphs (n = 0), as released. The passages of each search are the
retrieved texts, or, with ``rewards.passage_source: response``, the released scorer's parse of the
response text (:func:`stepsearch.rewards.information.passages_from_response`; then one step per
search followed by an observation block, and repeats recognised by text).

Placement (``place_rewards``): a [B, L] tensor, zero except ``step_reward_scale · s_t`` at step t's
``SearchStep.end_index`` (its ``</search>`` token) and R (or −1) at ``Trajectory.last_token_index``.
Scores that land on the same token add up (the released code overwrote a step score there with R).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stepsearch.data.schema import Example
from stepsearch.evaluation.metrics import exact_match_score, f1_score
from stepsearch.rewards.config import RewardConfig
from stepsearch.rewards.format import extract_answer, is_valid_format
from stepsearch.rewards.information import (
    EmbeddingTable,
    EmbedFn,
    information_gains,
    passages_from_response,
    redundancy_penalties,
    repeat_fractions,
    tfidf_similarity,
)
from stepsearch.rewards.outcome import global_score, search_key_reward
from stepsearch.rollout.trajectory import Trajectory, TrajectoryRecord


@dataclass
class TrajectoryScore:
    """Everything the reward computed for one trajectory (lists are per search step)."""

    format_ok: bool
    answer: str | None
    answer_f1: float
    answer_em: float
    key_score: float  # r_key, computed even when its switch is off (for logging)
    global_score: float  # R, or the format penalty
    info_gains: list[float] = field(default_factory=list)  # IG_t; empty when n = 0
    redundancies: list[float] = field(default_factory=list)  # RP_t
    step_scores: list[float] = field(default_factory=list)  # s_t as placed (before scaling); may be empty
    num_searches: int = 0


def compute_step_scores(
    info_gains: Sequence[float],
    redundancies: Sequence[float],
    use_information_gain: bool = True,
    use_redundancy_penalty: bool = True,
) -> list[float]:
    """s_t = [use_ig]·IG_t − [use_rp]·RP_t."""
    return [
        (gain if use_information_gain else 0.0) - (penalty if use_redundancy_penalty else 0.0)
        for gain, penalty in zip(info_gains, redundancies)
    ]


def step_passage_texts(record: TrajectoryRecord, config: RewardConfig) -> list[list[str]]:
    """The passage texts of each search step, from ``config.passage_source`` (module docstring)."""
    if config.passage_source == "response":
        return passages_from_response(record.response_text)
    return [list(step.passage_texts) for step in record.steps]


def score_trajectory(
    record: TrajectoryRecord,
    example: Example,
    config: RewardConfig,
    similarity=None,
) -> TrajectoryScore:
    """Score one trajectory; ``similarity(docs, golds) -> [P, n]`` defaults to TF-IDF cosine."""
    similarity = similarity or tfidf_similarity
    text = record.response_text
    format_ok = is_valid_format(text, config.environment_tags, config.trailing_ignore)
    answer = extract_answer(text, config.environment_tags)
    answer_f1 = f1_score(answer, example.answers)
    answer_em = exact_match_score(answer, example.answers)
    key_score = search_key_reward([s.query for s in record.steps], example.search_keys, config.key_update)
    score = global_score(
        format_ok,
        answer_f1 if config.answer_metric == "f1" else answer_em,
        key_score,
        key_weight=config.key_weight,
        use_key=config.search_key_reward,
        format_penalty=config.format_penalty,
    )

    step_texts = step_passage_texts(record, config)
    if config.passage_source == "response":
        redundancies = repeat_fractions(step_texts)  # by text, as released
    else:
        redundancies = redundancy_penalties(record.steps)
    golds = [g.text for g in example.golden_passages]
    info_gains: list[float] = []
    if golds:
        docs = [t for texts in step_texts for t in texts]
        step_of_doc = [i for i, texts in enumerate(step_texts) for _ in texts]
        sims = similarity(docs, golds)
        info_gains = information_gains(sims, step_of_doc, len(step_texts)).tolist()

    step_scores: list[float] = []
    if format_ok and config.step_rewards and golds:
        step_scores = compute_step_scores(info_gains, redundancies, config.information_gain, config.redundancy_penalty)
    return TrajectoryScore(
        format_ok=format_ok,
        answer=answer,
        answer_f1=answer_f1,
        answer_em=answer_em,
        key_score=key_score,
        global_score=score,
        info_gains=info_gains,
        redundancies=redundancies,
        step_scores=step_scores,
        num_searches=len(record.steps),
    )


def score_trajectories(
    records: Sequence[TrajectoryRecord],
    examples: Sequence[Example],
    config: RewardConfig,
    embed: EmbedFn | None = None,
) -> list[TrajectoryScore]:
    """Score a batch: ``records[i]`` answers ``examples[i]``. ``embed`` is needed for dense similarity."""
    if len(records) != len(examples):
        raise ValueError(f"score_trajectories: {len(records)} trajectories but {len(examples)} examples")
    similarity = tfidf_similarity
    if config.similarity == "dense":
        if embed is None:
            raise ValueError("RewardConfig.similarity='dense' needs an embed(texts) -> ndarray callable")
        texts = [t for r in records for step in step_passage_texts(r, config) for t in step]
        texts += [g.text for e in examples for g in e.golden_passages]
        similarity = EmbeddingTable(texts, embed).similarity  # one embed call for the whole batch
    return [score_trajectory(r, e, config, similarity) for r, e in zip(records, examples)]


def summarize_scores(scores: Sequence[TrajectoryScore]) -> dict[str, float]:
    """Batch means for logging.

    ``reward``: mean R (−1 for invalid format); ``info_gain``: mean per-trajectory Σ_t IG_t (golden
    coverage); ``redundancy``: mean RP_t over all search steps; ``step_score``: mean per-trajectory
    Σ_t s_t; ``searches``: mean search steps per trajectory; the rest are plain means.
    """
    if not scores:
        keys = ("reward", "answer_f1", "answer_em", "key_score", "info_gain", "redundancy", "format_ok", "searches")
        return {k: 0.0 for k in keys + ("step_score",)}
    all_redundancies = [r for s in scores for r in s.redundancies]
    return {
        "reward": float(np.mean([s.global_score for s in scores])),
        "answer_f1": float(np.mean([s.answer_f1 for s in scores])),
        "answer_em": float(np.mean([s.answer_em for s in scores])),
        "key_score": float(np.mean([s.key_score for s in scores])),
        "info_gain": float(np.mean([sum(s.info_gains) for s in scores])),
        "redundancy": float(np.mean(all_redundancies)) if all_redundancies else 0.0,
        "format_ok": float(np.mean([s.format_ok for s in scores])),
        "searches": float(np.mean([s.num_searches for s in scores])),
        "step_score": float(np.mean([sum(s.step_scores) for s in scores])),
    }


def place_rewards(scores: Sequence[TrajectoryScore], trajectory: Trajectory, config: RewardConfig) -> torch.Tensor:
    """[B, L] float32 token scores: scaled s_t at each ``</search>``, R (or −1) at the last policy token."""
    batch, length = trajectory.input_ids.shape
    if len(scores) != batch:
        raise ValueError(f"place_rewards: {len(scores)} scores for a batch of {batch} trajectories")
    device = trajectory.input_ids.device
    last = trajectory.last_token_index.tolist()
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    step_rows: list[int] = []
    step_cols: list[int] = []
    for b, score in enumerate(scores):
        if score.format_ok and config.step_rewards:
            for step, step_score in zip(trajectory.records[b].steps, score.step_scores):
                if not 0 <= step.end_index < length:
                    raise ValueError(f"trajectory {b}: search step end_index {step.end_index} outside [0, {length})")
                step_rows.append(b)
                step_cols.append(step.end_index)
                values.append(step_score * config.step_reward_scale)
    rows.extend(step_rows)
    cols.extend(step_cols)
    rows.extend(range(batch))
    cols.extend(last)
    values.extend(s.global_score for s in scores)

    if step_rows:
        mask = trajectory.loss_mask
        index = (torch.tensor(step_rows, device=mask.device), torch.tensor(step_cols, device=mask.device))
        on_policy = mask[index].bool()
        if not bool(on_policy.all()):
            bad = int((~on_policy).nonzero()[0, 0])
            raise ValueError(
                f"trajectory {step_rows[bad]}: step reward position {step_cols[bad]} "
                "is not a policy token (loss_mask 0)"
            )
    placed = torch.zeros(batch, length, dtype=torch.float32, device=device)
    placed.index_put_(
        (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
        torch.tensor(values, dtype=torch.float32, device=device),
        accumulate=True,
    )
    return placed
