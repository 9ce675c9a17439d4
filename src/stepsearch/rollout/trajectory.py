"""The trajectory batch: what a rollout produces and what rewards and PPO consume.

Layout: one row per trajectory, right-padded to a common length ``L``. Row ``b`` holds
``prompt + response`` token ids; positions ``[0, prompt_lengths[b])`` are the prompt. Masks are built
from token ids at concatenation time by the engine (never by re-tokenizing text):

- ``attention_mask[b, i] = 1`` for real tokens, 0 for padding;
- ``loss_mask[b, i] = 1`` only on tokens the policy generated (0 on prompt, ``<information>``,
  warnings and the newlines around them, and padding).

Token positions in :class:`SearchStep` and ``last_token_index`` index into those rows.

``rollout_logprobs[b, i]`` (optional, float32) is the rollout engine's log-prob of token ``i`` given
the tokens before it, ``log softmax(logits / temperature)`` over the full vocabulary (the trainer's
definition), on policy tokens only (0 elsewhere). The trainer recomputes these log-probs anyway; the
engine's copy serves the truncated importance-sampling correction (``ppo.correction``), which
reweights tokens where the two engines disagree (vLLM kernels vs. the training forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SearchStep:
    """One ``<search>`` action and what the environment returned for it."""

    query: str
    passage_ids: list[str]
    passage_titles: list[str]
    passage_texts: list[str]
    end_index: int  # index (in the row) of the last token of this step's `</search>`: the step reward's position
    turn: int = 0


@dataclass
class TrajectoryRecord:
    """Per-trajectory records that are not tensors."""

    prompt_text: str
    response_text: str  # the decoded response (policy + environment tokens), for logging and rewards
    answer: str | None  # content of the last <answer> block, None if absent
    steps: list[SearchStep] = field(default_factory=list)
    num_turns: int = 0
    invalid_actions: list[str] = field(default_factory=list)  # e.g. "no_action", "empty_query", "search_on_last_turn"
    finished: bool = False  # ended with an <answer> (or EOS) before the turn budget ran out
    truncated: bool = False  # hit the context cap


@dataclass
class Trajectory:
    """A batch of trajectories (see module docstring for the layout)."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    loss_mask: torch.Tensor  # [B, L] long/bool, 1 on policy-generated tokens only
    prompt_lengths: torch.Tensor  # [B] long
    records: list[TrajectoryRecord]
    timing: dict[str, float] = field(default_factory=dict)  # generation_s, retrieval_s, tokens_generated, ...
    rollout_logprobs: torch.Tensor | None = None  # [B, L] float32, the engine's log-probs on policy tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B] index of the last policy-generated token of each row (the global reward's position).

        A row with no policy token (cannot normally happen) points at its last prompt token.
        """
        positions = torch.arange(self.loss_mask.shape[1], device=self.loss_mask.device)
        masked = torch.where(self.loss_mask.bool(), positions, torch.full_like(positions, -1))
        last = masked.max(dim=1).values
        return torch.where(last >= 0, last, self.prompt_lengths - 1)

    def to(self, device) -> "Trajectory":
        return Trajectory(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            prompt_lengths=self.prompt_lengths.to(device),
            records=self.records,
            timing=dict(self.timing),
            rollout_logprobs=None if self.rollout_logprobs is None else self.rollout_logprobs.to(device),
        )
