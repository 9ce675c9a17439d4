"""Batched generation with a KV cache kept across turns (the Hugging Face rollout backend).

``DecodeSession`` keeps one KV cache for a rollout batch across its turns, so each turn only feeds
the new tokens (the environment's text) instead of re-reading the whole context, then decodes one
token per step with its own sampling (temperature + top-p from each row's own seeded stream,
:mod:`stepsearch.rollout.seeding`, or greedy). A row stops at an EOS id, at a stop tag (``</search>``, ``</answer>``) or at its token
limit. Stop tags are detected by id when the tokenizer has them as single tokens, else by decoding
the row's last few tokens when the new token contains ``>`` (so a tag is found whatever its ``>``
merges with: Qwen2.5 writes ``</search>\n\n`` as ``</`` ``search`` ``>\n\n``). Embedding rows past
the tokenizer's length (padding rows) are never sampled. Finished rows are dropped from the
cache (``Cache.batch_select_indices``). Works with any module that has the Hugging Face causal-LM
forward signature (``input_ids, attention_mask, position_ids, cache | past_key_values, use_cache,
logits_to_keep``) and returns ``logits`` and the cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from stepsearch.rollout.template import STOP_TAGS

TAIL_TOKENS = 16  # tokens decoded when checking for a multi-token stop tag


@dataclass
class TurnOutput:
    """What one row generated in a turn and why it stopped ("eos", "tag" or "length"), and the
    log-prob of each generated token under the rollout engine (``None`` when not computed)."""

    ids: list[int]
    stop: str
    logprobs: list[float] | None = None


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
            # Only a token containing '>' can complete a tag: check those rows' decoded tails. Token
            # strings keep '>' as is (byte-level BPE maps printable ASCII to itself; SentencePiece
            # byte pieces like <0x3E> contain one too), so this is a superset, found in one call.
            count = min(vocab_size, len(tokenizer))
            tokens = tokenizer.convert_ids_to_tokens(list(range(count)))
            flags = [token is not None and ">" in token for token in tokens]
            self.has_gt[:count] = torch.tensor(flags, dtype=torch.bool)

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


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens`` over the full vocabulary: the trainer's
    definition of a token's log-prob (``training.score_batch``), whatever top-p kept."""
    return (logits.float() / max(temperature, 1e-6)).log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
                generator: torch.Generator | None = None, max_rounds: int = 64, *,
                uniform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next token per row: argmax, or a draw from the temperature-scaled top-p (nucleus) distribution.

    Uniforms come from ``uniform(rows)`` (the next draw of each of ``rows``, indices into ``logits``:
    per-row streams, :class:`~stepsearch.rollout.seeding.RowStreams`) or else from ``generator``.

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
        if uniform is not None:
            u = uniform(pending).view(-1, 1).to(rows_cdf.dtype) * rows_cdf[:, -1:]
        else:
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
        # A PEFT wrapper forwards **kwargs to its base model: read the names off the base model.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
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


class DecodeSession:
    """Batched generation over the turns of one rollout batch, with one KV cache kept across turns.

    Each turn feeds only what is new since the row's last forward pass (the whole prompt on the
    first turn; afterwards the turn's last sampled token and the environment's text) as one chunk,
    right-aligned so every row's last real token is in the last column; then decodes one token per
    step. Row layout in the cache is "real tokens with holes": left padding of chunks and steps a
    row sits out are masked columns, and position ids count real tokens only, so every row sees
    exactly its own sequence. A row that stops on EOS is dropped at once (it is finished); a row
    that stops on a tag or its limit waits, masked, until the turn ends, because the environment
    will extend it; rows the caller no longer passes are dropped at the next turn. Requires an
    attention implementation that takes arbitrary 2-D padding masks (eager, sdpa).
    """

    def __init__(self, forward: ForwardAdapter, stop_rule: StopRule, *, pad_id: int, device,
                 greedy: bool, temperature: float = 1.0, top_p: float = 1.0,
                 streams=None, logprobs: bool = False, valid_tokens: int | None = None):
        self.forward, self.stop_rule, self.pad_id, self.device = forward, stop_rule, pad_id, device
        # Ids >= valid_tokens (the tokenizer's length) are embedding rows no token maps to, e.g. the
        # 271 rows Qwen2.5 pads its vocabulary with: never sampled (their logits are set to -inf, so
        # log-probs are over the tokenizer's ids, as vLLM's with its padding-row mask).
        self.valid_tokens = valid_tokens
        # Per-token log-probs cost a full-vocabulary float log-softmax per step: only when asked
        # (``RolloutConfig.return_logprobs``, for truncated IS); otherwise ``TurnOutput.logprobs`` is None.
        self.logprobs = logprobs
        # ``streams``: per-row uniforms indexed by the caller's row keys (ints), RowStreams.
        self.greedy, self.temperature, self.top_p, self.streams = greedy, temperature, top_p, streams
        self.cache = None
        self.attention: torch.Tensor | None = None  # [slots, columns] 1 on real tokens
        self.keys: list = []  # caller's row key per cache slot
        self.fed: list[int] = []  # real tokens of each slot already in the cache

    def _keep(self, slots: list[int]) -> None:
        if slots == list(range(len(self.keys))):
            return
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.cache = select_cache_rows(self.cache, index)
        self.attention = self.attention.index_select(0, index)
        self.keys = [self.keys[i] for i in slots]
        self.fed = [self.fed[i] for i in slots]

    @torch.no_grad()
    def run_turn(self, keys: list, contexts: list[list[int]], max_new: list[int]) -> list[TurnOutput]:
        """Generate one turn for rows ``keys`` whose full token sequences are ``contexts``."""
        if self.cache is None:
            self.keys, self.fed = list(keys), [0] * len(keys)
        else:
            slot_of = {key: slot for slot, key in enumerate(self.keys)}
            missing = [key for key in keys if key not in slot_of]
            if missing:
                raise RuntimeError(f"rows {missing[:5]} left the decode session earlier and cannot come back")
            self._keep([slot_of[key] for key in keys])
        logits = self._feed_new_tokens(contexts)
        n_slots = len(keys)
        limits = dict(zip(keys, max_new))
        generated: dict = {key: [] for key in keys}
        logprobs: dict = {key: [] for key in keys}
        results: dict = {}
        running = list(range(n_slots))  # slots still generating this turn
        # Greedy log-probs are those of the raw logits (as vLLM reports them for greedy requests).
        logprob_temperature = 1.0 if self.greedy else self.temperature
        while True:
            step_logits = logits.index_select(0, torch.tensor(running, device=logits.device))
            if self.valid_tokens is not None and self.valid_tokens < step_logits.shape[-1]:
                step_logits[:, self.valid_tokens:] = float("-inf")
            uniform = None
            if self.streams is not None:  # each running slot draws from its own row's stream
                row_keys = torch.tensor([self.keys[slot] for slot in running], dtype=torch.long)
                uniform = lambda rows, keys=row_keys: self.streams.draw(keys[rows.cpu()])  # noqa: E731
            tokens = sample_next(step_logits, self.greedy, self.temperature, self.top_p, uniform=uniform)
            if self.logprobs:
                step_logprobs = sampled_logprobs(step_logits, tokens, logprob_temperature)
                # One device sync per step: ids (< 2**53) travel exactly as float64 beside the log-probs.
                token_values, logprob_list = torch.stack([tokens.double(), step_logprobs.double()]).tolist()
                token_list = [int(token) for token in token_values]
                for slot, logprob in zip(running, logprob_list):
                    logprobs[self.keys[slot]].append(logprob)
            else:
                token_list = tokens.tolist()
            for slot, token in zip(running, token_list):
                generated[self.keys[slot]].append(token)
            reasons = self.stop_rule.classify(tokens, [generated[self.keys[slot]] for slot in running])
            still, fed_tokens, finished = [], [], []
            for slot, token, reason in zip(running, token_list, reasons):
                key = self.keys[slot]
                reason = reason or ("length" if len(generated[key]) >= limits[key] else None)
                if reason is None:
                    still.append(slot)
                    fed_tokens.append(token)
                else:
                    results[key] = TurnOutput(generated[key], reason, logprobs[key] if self.logprobs else None)
                    if reason == "eos":
                        finished.append(slot)
            if not still:
                break
            if finished:  # finished rows leave the cache now; the others keep their slots
                finished_set = set(finished)
                kept = [slot for slot in range(len(self.keys)) if slot not in finished_set]
                remap = {old: new for new, old in enumerate(kept)}
                self._keep(kept)
                still = [remap[slot] for slot in still]
            logits, running = self._step(still, fed_tokens), still
        return [results[key] for key in keys]

    def _feed_new_tokens(self, contexts: list[list[int]]) -> torch.Tensor:
        new = [ctx[fed:] for ctx, fed in zip(contexts, self.fed)]
        width = max(len(chunk) for chunk in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        positions = torch.zeros((len(new), width), dtype=torch.long)
        for slot, chunk in enumerate(new):
            if chunk:
                ids[slot, width - len(chunk):] = torch.tensor(chunk, dtype=torch.long)
                mask[slot, width - len(chunk):] = 1
                positions[slot, width - len(chunk):] = torch.arange(self.fed[slot], self.fed[slot] + len(chunk))
            self.fed[slot] += len(chunk)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        self.attention = mask if self.attention is None else torch.cat([self.attention, mask], dim=1)
        logits, self.cache = self.forward(ids, self.attention, positions, self.cache)
        return logits

    def _step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token to ``slots``; the other slots get a masked pad column."""
        n_slots = len(self.keys)
        ids = torch.full((n_slots, 1), self.pad_id, dtype=torch.long)
        column = torch.zeros((n_slots, 1), dtype=torch.long)
        positions = torch.tensor(self.fed, dtype=torch.long).unsqueeze(1)
        index = torch.tensor(slots, dtype=torch.long)
        ids[index, 0] = torch.tensor(tokens, dtype=torch.long)
        column[index, 0] = 1
        for slot in slots:
            self.fed[slot] += 1
        self.attention = torch.cat([self.attention, column.to(self.device)], dim=1)
        logits, self.cache = self.forward(ids.to(self.device), self.attention, positions.to(self.device), self.cache)
        return logits
