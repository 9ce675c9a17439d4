"""Rewards of StepSearch (METHOD.md §2): format gate, answer and search-key rewards, information gain,
redundancy penalty, and their placement on tokens. Pure functions; formulas in each module's docstring.
"""

from stepsearch.rewards.config import RewardConfig
from stepsearch.rewards.format import extract_answer, is_valid_format, strip_environment_blocks
from stepsearch.rewards.information import (
    EmbeddingTable,
    dense_similarity,
    information_gains,
    passage_key,
    redundancy_penalties,
    tfidf_similarity,
)
from stepsearch.rewards.outcome import answer_reward, global_score, search_key_reward
from stepsearch.rewards.scoring import (
    TrajectoryScore,
    compute_step_scores,
    place_rewards,
    score_trajectories,
    score_trajectory,
    summarize_scores,
)

__all__ = [
    "RewardConfig",
    "TrajectoryScore",
    "EmbeddingTable",
    "answer_reward",
    "compute_step_scores",
    "dense_similarity",
    "extract_answer",
    "global_score",
    "information_gains",
    "is_valid_format",
    "passage_key",
    "place_rewards",
    "redundancy_penalties",
    "score_trajectories",
    "score_trajectory",
    "search_key_reward",
    "strip_environment_blocks",
    "summarize_scores",
    "tfidf_similarity",
]
