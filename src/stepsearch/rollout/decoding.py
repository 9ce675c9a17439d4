"""Batched generation of one turn with a KV cache (the Hugging Face backend of the rollout engine).

``generate_turn`` left-pads the active contexts, prefills them in one forward pass, then decodes one
token per step for the rows still running, with its own sampling (temperature + top-p through a
seeded ``torch.Generator``, or greedy). A row stops at an EOS id, at a stop tag (``</search>``,
``</answer>``) or at its token limit. Stop tags are detected by id when the tokenizer has them as
single tokens, else by decoding the row's last few tokens when the new token contains ``>``. Rows
that stop are dropped from the batch and from the cache (``Cache.batch_select_indices``), so compute
goes to the rows still generating. Works with any module that has the Hugging Face causal-LM
forward signature (``input_ids, attention_mask, position_ids, cache | past_key_values, use_cache,
logits_to_keep``) and returns ``logits`` and the cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from stepsearch.rollout.template import STOP_TAGS

TAIL_TOKENS = 16  # tokens decoded when checking for a multi-token stop tag


@dataclass
class TurnOutput:
    """What one row generated in a turn and why it stopped ("eos", "tag" or "length")."""

    ids: list[int]
    stop: str


class StopRule:
    """Stop conditions for a tokenizer: EOS ids, single-id stop tags, and text-checked tags."""

    def __init__(self, tokenizer, eos_ids: list[int], vocab_size: int, tags=STOP_TAGS):
        self.tokenizer = tokenizer
        self.eos_ids = sorted({i for i in eos_ids if i is not None})
        self.tag_ids: list[int] = []
        self.text_tags: list[str] = []
        for tag in tags:
            ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                self.tag_ids.append(ids[0])
            else:
                self.text_tags.append(tag)
        self.has_gt = torch.zeros(vocab_size, dtype=torch.bool)
        if self.text_tags:
            # Only a token containing '>' can complete a tag: check those rows' decoded tails.
            for token_id in range(min(vocab_size, len(tokenizer))):
                if ">" in tokenizer.decode([token_id]):
                    self.has_gt[token_id] = True

    def to(self, device) -> "StopRule":
        self.eos_t = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        self.tag_t = torch.tensor(self.tag_ids, dtype=torch.long, device=device)
        self.has_gt = self.has_gt.to(device)
        return self

    def classify(self, tokens: torch.Tensor, generated: list[list[int]]) -> list[str | None]:
        """Stop reason per row for the tokens just appended to ``generated`` (None = keep going)."""
        is_eos = torch.isin(tokens, self.eos_t).tolist() if self.eos_ids else [False] * len(generated)
        is_tag = torch.isin(tokens, self.tag_t).tolist() if self.tag_ids else [False] * len(generated)
        check = self.has_gt[tokens].tolist() if self.text_tags else [False] * len(generated)
        reasons: list[str | None] = []
        for row, ids in enumerate(generated):
            if is_eos[row]:
                reasons.append("eos")
            elif is_tag[row]:
                reasons.append("tag")
            elif check[row] and self._tail_has_tag(ids):
                reasons.append("tag")
            else:
                reasons.append(None)
        return reasons

    def _tail_has_tag(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-TAIL_TOKENS:], skip_special_tokens=False)
        return any(tag in tail for tag in self.text_tags)


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
                generator: torch.Generator | None, max_rounds: int = 64) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the temperature-scaled top-p (nucleus) distribution.

    Nucleus sampling without sorting the vocabulary: draw from the full distribution by inverse CDF
    and accept the draw when the probability mass strictly above it is below ``top_p`` (i.e. it lies
    in the nucleus); rejected rows draw again. Accepting with probability = nucleus mass (>= top_p)
    makes this exact: the accepted draws follow p restricted to the nucleus, renormalised. Tokens
    tied at the nucleus boundary are all kept (a sort would keep an arbitrary subset of them).
    """
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    last = probs.shape[-1] - 1
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    pending = torch.arange(probs.shape[0], device=probs.device)
    for _ in range(max_rounds):
        rows_cdf = cdf.index_select(0, pending)
        u = torch.rand(len(pending), 1, device=probs.device, generator=generator) * rows_cdf[:, -1:]
        draw = torch.searchsorted(rows_cdf, u, right=True).clamp_(max=last)
        if top_p >= 1.0:
            tokens[pending] = draw.squeeze(1)
            return tokens
        rows_p = probs.index_select(0, pending)
        p_draw = rows_p.gather(1, draw)
        above = (rows_p * (rows_p > p_draw)).sum(dim=1)
        accepted = above < top_p
        tokens[pending[accepted]] = draw.squeeze(1)[accepted]
        pending = pending[~accepted]
        if len(pending) == 0:
            return tokens
    # Practically unreachable (each round accepts with probability >= top_p): take the mode.
    tokens[pending] = probs.index_select(0, pending).argmax(dim=-1)
    return tokens


class ForwardAdapter:
    """Calls a causal LM with the cache keyword its forward accepts (``cache`` in transformers >= 5,
    ``past_key_values`` before) and ``logits_to_keep=1`` when supported."""

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.keep_key = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def __call__(self, input_ids, attention_mask, position_ids, cache):
        kwargs = {self.cache_key: cache, "use_cache": True}
        if self.keep_key:
            kwargs[self.keep_key] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :], new_cache


def select_cache_rows(cache, index: torch.Tensor):
    """Keep only ``index`` rows of a KV cache (a ``Cache`` object or a legacy tuple of tuples)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


@torch.no_grad()
def generate_turn(
    forward: ForwardAdapter,
    contexts: list[list[int]],
    max_new: list[int],
    stop_rule: StopRule,
    *,
    pad_id: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> list[TurnOutput]:
    """Generate one turn for every context (left-padded batch, KV cache, finished rows dropped)."""
    n_rows = len(contexts)
    width = max(len(c) for c in contexts)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    for row, ctx in enumerate(contexts):
        input_ids[row, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        attention[row, width - len(ctx):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits, cache = forward(input_ids, attention, positions, None)
    next_pos = positions[:, -1:] + 1

    rows = list(range(n_rows))  # original row of each batch slot still generating
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    limits = list(max_new)
    results: list[TurnOutput | None] = [None] * n_rows
    while True:
        tokens = sample_next(logits, greedy, temperature, top_p, generator)
        token_list = tokens.tolist()
        for slot, row in enumerate(rows):
            generated[row].append(token_list[slot])
        reasons = stop_rule.classify(tokens, [generated[row] for row in rows])
        keep: list[int] = []
        for slot, row in enumerate(rows):
            reason = reasons[slot] or ("length" if len(generated[row]) >= limits[row] else None)
            if reason is None:
                keep.append(slot)
            else:
                results[row] = TurnOutput(generated[row], reason)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, dtype=torch.long, device=tokens.device)
            cache = select_cache_rows(cache, index)
            tokens, attention, next_pos = tokens[index], attention[index], next_pos[index]
            rows = [rows[slot] for slot in keep]
        attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
        logits, cache = forward(tokens.unsqueeze(1), attention, next_pos, cache)
        next_pos = next_pos + 1
    return [r for r in results if r is not None]
