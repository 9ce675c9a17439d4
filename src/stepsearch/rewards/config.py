"""Reward configuration: every switch of METHOD.md §2 (the paper's ablations) in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal
from stepsearch.errors import ConfigError

# End-of-sequence strings a decoder may leave after the final `</answer>` when special tokens are not
# skipped; they are not text the model wrote, so the format gate ignores them.
DEFAULT_TRAILING_IGNORE: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<eos>")


@dataclass
class RewardConfig:
    """How a trajectory is scored (METHOD.md §2).

    Attributes:
        answer_metric: ``"f1"`` (paper and released code) or ``"em"`` for r_ans.
        search_key_reward: add ``key_weight * r_key`` to the global score (§2c, d).
        key_weight: γ_key, 0.618 as released.
        key_update: ``"overwrite"`` (released: a later query matching the same key group replaces its
            score) or ``"max"`` (a group keeps its best score).
        information_gain: include IG_t in the step score (§2e).
        redundancy_penalty: subtract RP_t in the step score (§2f).
        step_rewards: master switch for step scores; off with ``search_key_reward`` off is the plain
            global-reward PPO baseline (Search-R1 style).
        step_reward_scale: factor on each step score where it is placed. Default 1.6: the released
            reward manager meant ``row += 0.6 * step_tensor(row)``, but ``step_tensor`` writes the
            step scores into ``row`` in place and returns that same view, so the row ends up holding
            ``s + 0.6 s = 1.6 s``. The reproduction keeps the effective 1.6; 0.6 is the written intent.
        passage_source: where the information gain and redundancy penalty read the passages of each
            search. ``"retrieved"`` (ours): the texts the retriever returned, a repeat recognised by
            id. ``"response"`` (released): parsed back out of the response text as the released
            scorer does, which leaves ``"\\nDoc k+1"`` on every passage but the last of a search
            and compares texts, so a passage repeated at another rank is not a repeat
            (:func:`stepsearch.rewards.information.passages_from_response`; needs the ``stepsearch``
            observation format).
        similarity: ``"tfidf"`` (released: TF-IDF cosine of normalised texts, IDF fitted on
            {d} ∪ G) or ``"dense"`` (cosine of embeddings from an ``embed`` callable).
        format_penalty: the score of a trajectory that fails the format gate (§2a), −1.
        environment_tags: blocks the environment inserts (their content is not the model's text,
            so an ``<answer>`` inside them never counts).
        trailing_ignore: strings ignored after the last ``</answer>`` by the format gate (EOS text).
    """

    answer_metric: Literal["f1", "em"] = "f1"
    search_key_reward: bool = True
    key_weight: float = 0.618
    key_update: Literal["overwrite", "max"] = "overwrite"
    information_gain: bool = True
    redundancy_penalty: bool = True
    step_rewards: bool = True
    step_reward_scale: float = 1.6
    passage_source: Literal["retrieved", "response"] = "retrieved"
    similarity: Literal["tfidf", "dense"] = "tfidf"
    format_penalty: float = -1.0
    environment_tags: tuple[str, ...] = ("information", "warning")
    trailing_ignore: tuple[str, ...] = DEFAULT_TRAILING_IGNORE

    def __post_init__(self) -> None:
        if self.answer_metric not in ("f1", "em"):
            raise ConfigError(f"model.rewards.answer_metric must be 'f1' or 'em', got {self.answer_metric!r}")
        if self.key_update not in ("overwrite", "max"):
            raise ConfigError(f"model.rewards.key_update must be 'overwrite' or 'max', got {self.key_update!r}")
        if self.passage_source not in ("retrieved", "response"):
            raise ConfigError(f"model.rewards.passage_source must be 'retrieved' or 'response', "
                              f"got {self.passage_source!r}")
        if self.similarity not in ("tfidf", "dense"):
            raise ConfigError(f"model.rewards.similarity must be 'tfidf' or 'dense', got {self.similarity!r}")
        self.environment_tags = tuple(self.environment_tags)
        self.trailing_ignore = tuple(self.trailing_ignore)

    def global_only(self, **overrides) -> "RewardConfig":
        """This config as the plain global-reward baseline: answer reward and format gate only."""
        return replace(self, search_key_reward=False, information_gain=False, redundancy_penalty=False,
                       step_rewards=False, **overrides)
