"""A scripted policy: a causal-LM stand-in whose next tokens are fixed in advance.

``ScriptedPolicy`` has the Hugging Face causal-LM forward signature the rollout engine uses and
returns logits that put all the mass on the next scripted token, so greedy decoding and sampling
both reproduce the script. Each question has a list of turn texts (tokenized with the real
tokenizer); the policy emits turn 0, waits for the environment, emits turn 1, and so on. Uses: exact
mask tests of the engine, and golden SFT trajectories with real retrieval (turns such as
``"<think>…</think><search> key </search>"``, …, ``"<answer> gold </answer>"``).

How it knows where it is, whatever the engine does with its batch (left padding, rows dropped,
fresh prefill each turn): the policy is stateless per call. It keeps a rolling hash of each row's
tokens (carried in the cache it returns) and a memo from "hash of a sequence that ends with a token
I emitted" to "(script, turn, tokens of that turn emitted)". A row whose last token is its own
continues the turn; a row whose last own token is followed by other tokens (an observation) starts
the next turn; a row with no own token yet starts turn 0 of the script whose question appears in its
text. Identical rows get identical hashes, so duplicate questions in a batch are fine.

After a turn's text: EOS if it was the last turn (``eos_after_last``), else ``filler`` tokens until
the engine cuts the turn (a turn that does not end with ``</search>``/``</answer>`` runs to the
per-turn limit). Once the script is used up, EOS. With ``base_model`` (e.g. the tiny Qwen2), every
call also runs the real model and carries its KV cache, so the engine's real cache path is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Sequence

import torch
from torch import nn

from stepsearch.rollout.template import normalize_question
from stepsearch.rollout.decoding import ForwardAdapter

_P1, _B1 = 2_147_483_647, 1_000_003
_P2, _B2 = 2_147_483_629, 998_244_353
_NEG = -1.0e4  # softmax(_NEG vs 0) is exactly one-hot in float32

# Per-row state columns carried in the cache.
_H1, _H2, _LEN, _SCRIPT, _TURN, _DONE_K, _MATCH_LEN = range(7)


class ScriptedCache:
    """The policy's cache: per-row hash state plus the base model's KV cache (if any)."""

    def __init__(self, state: torch.Tensor, inner=None):
        self.state = state  # [B, 7] long
        self.inner = inner

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = self.state[indices.to(self.state.device)]
        if self.inner is not None:
            if hasattr(self.inner, "batch_select_indices"):
                self.inner.batch_select_indices(indices)
            else:
                self.inner = tuple(tuple(t.index_select(0, indices) for t in layer) for layer in self.inner)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.state[:, _LEN].max()) if len(self.state) else 0


@dataclass
class ScriptedOutput:
    logits: torch.Tensor
    cache: ScriptedCache

    @property
    def past_key_values(self) -> ScriptedCache:
        return self.cache


class ScriptedPolicy(nn.Module):
    """Emit fixed turn texts per question (see module docstring).

    ``scripts``: ``{question: [turn_text, ...]}`` or a sequence of ``(question, turns)`` pairs;
    questions are matched as :func:`~stepsearch.rollout.template.format_prompt` writes them
    (stripped, ``?`` appended).
    """

    def __init__(self, tokenizer, scripts: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
                 *, base_model: nn.Module | None = None, eos_after_last: bool = True, filler: str = " "):
        super().__init__()
        items = list(scripts.items()) if isinstance(scripts, Mapping) else list(scripts)
        self.tokenizer = tokenizer
        self.questions = [normalize_question(q) for q, _ in items]
        self.turn_ids = [
            [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in turns] for _, turns in items
        ]
        self.eos_id = tokenizer.eos_token_id
        self.filler_id = tokenizer(filler, add_special_tokens=False)["input_ids"][0]
        self.eos_after_last = eos_after_last
        self.base_model = base_model
        vocab = getattr(getattr(base_model, "config", None), "vocab_size", None) or len(tokenizer)
        self.config = base_model.config if base_model is not None else SimpleNamespace(vocab_size=vocab)
        self.generation_config = getattr(base_model, "generation_config", None)
        self.vocab_size = vocab
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # gives the module a device
        self._memo: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        if base_model is not None:
            self._base_forward = ForwardAdapter(base_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: ScriptedCache | None = None,
                past_key_values: ScriptedCache | None = None, use_cache: bool | None = True,
                logits_to_keep: int = 0, **kwargs) -> ScriptedOutput:
        past = cache if cache is not None else past_key_values
        n_rows, q_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new_mask = attention_mask[:, -q_len:].tolist()
        inner = None
        if self.base_model is not None:
            if position_ids is None:
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            _, inner = self._base_forward(input_ids, attention_mask, position_ids, past.inner if past else None)
        if past is None:
            state = torch.tensor([[0, 0, 0, -1, -1, 0, -1]] * n_rows, dtype=torch.long)
        else:
            state = past.state.clone()
        rows = state.tolist()
        ids = input_ids.tolist()
        next_tokens, superseded = [], []
        for b in range(n_rows):
            row = rows[b]
            real = [tok for tok, keep in zip(ids[b], new_mask[b]) if keep]
            if row[_SCRIPT] < 0:
                row[_SCRIPT] = self._identify(real)
            self._advance(row, real)
            if row[_MATCH_LEN] == row[_LEN] and real:
                # Mid-turn: the entry just matched is superseded by the one this call writes. A turn's
                # last entry is never matched this way, so it stays for the next turn's prefill.
                superseded.append((row[_LEN], row[_H1], row[_H2]))
            token, turn, done_k = self._next(row)
            h1, h2 = (row[_H1] * _B1 + token + 1) % _P1, (row[_H2] * _B2 + token + 1) % _P2
            self._memo[(row[_LEN] + 1, h1, h2)] = (row[_SCRIPT], turn, done_k)
            next_tokens.append(token)
        for key in superseded:  # keeps the memo at about one entry per turn and row
            self._memo.pop(key, None)
        logits = self._logits(input_ids, new_mask, next_tokens, q_len if logits_to_keep != 1 else 1)
        return ScriptedOutput(logits, ScriptedCache(torch.tensor(rows, dtype=torch.long), inner))

    def reset(self) -> None:
        """Forget every row seen so far (not needed between calls; frees the memo)."""
        self._memo.clear()

    def _identify(self, tokens: list[int]) -> int:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        found = [(text.find(q), -len(q), i) for i, q in enumerate(self.questions) if q in text]
        if not found:
            raise ValueError(f"ScriptedPolicy: none of its {len(self.questions)} questions occurs in the prompt "
                             f"{text[-200:]!r}")
        return min(found)[2]

    def _advance(self, row: list[int], tokens: list[int]) -> None:
        """Extend the row's rolling hash; remember the latest prefix that ends with an own token."""
        h1, h2, length = row[_H1], row[_H2], row[_LEN]
        for token in tokens:
            h1, h2, length = (h1 * _B1 + token + 1) % _P1, (h2 * _B2 + token + 1) % _P2, length + 1
            hit = self._memo.get((length, h1, h2))
            if hit is not None:
                row[_SCRIPT], row[_TURN], row[_DONE_K], row[_MATCH_LEN] = (*hit, length)
        row[_H1], row[_H2], row[_LEN] = h1, h2, length

    def _next(self, row: list[int]) -> tuple[int, int, int]:
        """(token, turn, tokens of that turn emitted including it)."""
        turns = self.turn_ids[row[_SCRIPT]]
        if row[_MATCH_LEN] < 0:  # nothing emitted yet
            turn, k = 0, 0
        elif row[_MATCH_LEN] == row[_LEN]:  # our own token is last: continue the turn
            turn, k = row[_TURN], row[_DONE_K]
        else:  # the environment spoke after our last token: next turn
            turn, k = row[_TURN] + 1, 0
        if turn >= len(turns):
            token = self.eos_id
        elif k < len(turns[turn]):
            token = turns[turn][k]
        elif turn == len(turns) - 1 and self.eos_after_last:
            token = self.eos_id
        else:
            token = self.filler_id
        return token, turn, k + 1

    def _logits(self, input_ids, new_mask, next_tokens, width: int) -> torch.Tensor:
        n_rows, q_len = input_ids.shape
        logits = torch.full((n_rows, width, self.vocab_size), _NEG, device=self._anchor.device)
        targets = torch.tensor(next_tokens, device=logits.device)
        logits[torch.arange(n_rows, device=logits.device), -1, targets] = 0.0
        if width > 1:  # earlier positions: all mass on the token that actually follows
            follow = input_ids[:, 1:].to(logits.device)
            logits[:, :-1].scatter_(-1, follow.unsqueeze(-1), 0.0)
        return logits
