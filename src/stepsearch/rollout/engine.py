"""The rollout engine: multi-turn search-and-answer generation for a batch of questions (METHOD.md §1).

Turn loop, for every trajectory still active, up to ``max_turns``:

1. generate until ``</search>``, ``</answer>``, EOS or ``max_response_tokens`` (one batched call);
2. parse the first action: an answer ends the trajectory; a search goes, with every other search of
   this turn, to ONE batched ``retriever.search`` call, and its ``<information>`` block is appended;
   anything else (no tags, unclosed tag, empty query) appends an invalid-action ``<warning>``;
3. on the last turn the appended text also carries the no-more-searches warning;
4. after the loop, active trajectories get one final generation with search disabled (a search there
   is recorded as ``search_on_last_turn`` and ends the trajectory).

Sequences are built from token ids at concatenation time: policy tokens exactly as sampled (loss
mask 1), environment text (observations, warnings and their newlines) tokenized on its own and
inserted by id (loss mask 0). Nothing is re-tokenized from decoded text. An EOS without an answer
ends the trajectory (recorded as an invalid action); Search-R1 instead dropped the EOS when it
re-tokenized the text and went on. The context is capped at ``max_context_tokens``.

Backends implement ``_generate_turn`` (contexts in, generated ids and their log-probs out): the
Hugging Face engine (batched KV-cache decoding, :mod:`stepsearch.rollout.decoding`) and the vLLM
engine (:mod:`stepsearch.rollout.vllm_engine`, ``rollout.backend: vllm``), built by
:func:`stepsearch.rollout.factory.build_engine`. Settings: :mod:`stepsearch.rollout.config`
(``RolloutConfig`` is importable from here too).

Turns that do not wait for each other (``rollout.independent_turns``, backends with continuous
batching: vLLM): instead of the batch-synchronous loop above, every trajectory runs its own turn
loop. A row whose turn ends with a search goes to a retrieval queue (:class:`RetrievalQueue`, a
worker thread: all queries waiting when it frees up go to ONE ``retriever.search`` call) while the
other rows keep decoding; the row's next turn is submitted as soon as its observation is in. The
per-row state machine (``_take_turn``, ``_insert_environment``) is the same code in both loops and
each row's sampling depends only on (seed, row key) (:mod:`stepsearch.rollout.seeding`), so the two
loops give the same rows, and so does any split of the questions over batches or ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.base import Passage, Retriever
from stepsearch.rollout import template as tpl
from stepsearch.rollout.config import BACKENDS, RolloutConfig, VLLMSettings  # noqa: F401  (imported from here)
from stepsearch.rollout.decoding import TurnOutput
from stepsearch.rollout.retrieval_queue import RetrievalQueue, search_checked
from stepsearch.rollout.seeding import row_seed
from stepsearch.rollout.trajectory import SearchStep, Trajectory, TrajectoryRecord


@runtime_checkable
class RolloutEngine(Protocol):
    """Turns questions into a :class:`Trajectory` batch (sampled, or greedy for evaluation)."""

    def generate(self, questions: list[str], *, greedy: bool = False, seed: int | None = None,
                 row_keys: list | None = None) -> Trajectory: ...


@dataclass
class _Row:
    """One trajectory under construction: the prompt ids and the response pieces, each a list of ids
    with a flag saying whether the policy generated it and the engine's log-probs of policy ids."""

    prompt_text: str
    prompt_ids: list[int]
    pieces: list[tuple[list[int], bool, list[float] | None]] = field(default_factory=list)
    length: int = 0
    record: TrajectoryRecord | None = None
    done: bool = False
    # What the environment owes this row after the current turn: ("search", query, end_index) or
    # ("invalid",), and the passages once retrieved.
    pending: tuple | None = None
    passages: list[Passage] | None = None

    def context(self) -> list[int]:
        ids = list(self.prompt_ids)
        for piece, _, _ in self.pieces:
            ids.extend(piece)
        return ids

    def add(self, ids: list[int], policy: bool, logprobs: list[float] | None = None) -> int:
        """Append a piece; return the row index of its first token."""
        start = self.length
        self.pieces.append((list(ids), policy, logprobs))
        self.length += len(ids)
        return start


class TurnLoopEngine:
    """The environment protocol shared by every backend; subclasses provide ``_generate_turn``."""

    def __init__(self, tokenizer, retriever: Retriever, config: RolloutConfig | None = None):
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or RolloutConfig()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        head, tail = tpl.observation_parts(self.config.template, self.config.observation_format)
        self._obs_head = self._encode(head)
        self._obs_tail = self._encode(tail)

    # --- backend hooks ---------------------------------------------------------------------------
    def _generate_turn(self, keys: list[int], contexts: list[list[int]], max_new: list[int],
                       greedy: bool) -> list[TurnOutput]:
        """Generate one turn for the rows ``keys`` (stable row numbers within this ``generate`` call;
        row ``k`` samples from ``self.row_seeds[k]``) whose full token sequences are ``contexts``, at
        most ``max_new[i]`` tokens each."""
        raise NotImplementedError

    def _begin(self, seed: int, greedy: bool) -> None:
        """Prepare a generate call (``self.row_seeds`` holds each row's sampling seed)."""

    def _end(self) -> None:
        pass

    # Continuous batching (``independent_turns``): backends that set this implement ``_submit`` (start
    # one row's turn) and ``_poll`` (advance decoding by one step, return the turns that ended).
    independent_turns_supported = False

    def _submit(self, key: int, context: list[int], max_new: int, greedy: bool) -> None:
        raise NotImplementedError

    def _poll(self) -> list[tuple[int, TurnOutput]]:
        raise NotImplementedError

    def policy_updated(self) -> None:
        """Called after every PPO update of the policy this engine generates with. The Hugging Face
        engine generates with the live module (nothing to do); vLLM re-syncs its weights."""

    # --- the turn loops --------------------------------------------------------------------------
    def generate(self, questions: list[str], *, greedy: bool = False, seed: int | None = None,
                 row_keys: list | None = None) -> Trajectory:
        """Trajectories for ``questions``. Row ``i`` samples from a seed derived from ``seed`` and
        ``row_keys[i]`` only (default key: ``i``), so it does not depend on the rest of the batch
        (:mod:`stepsearch.rollout.seeding`; training passes the examples' keys)."""
        cfg = self.config
        seed = cfg.seed if seed is None else seed
        if seed is None:  # greedy draws nothing; sampling gets a fresh seed (never from the global RNG)
            seed = 0 if greedy else torch.Generator().seed()
        keys = list(range(len(questions))) if row_keys is None else list(row_keys)
        if len(keys) != len(questions):
            raise StepSearchError(f"generate: {len(keys)} row keys for {len(questions)} questions")
        self.row_seeds = [row_seed(seed, key) for key in keys]
        rows = [self._new_row(q) for q in questions]
        timing = {"generation_s": 0.0, "retrieval_s": 0.0, "retrieval_wait_s": 0.0, "tokens_generated": 0.0,
                  "turns": 0.0, "retrieval_calls": 0.0}
        start = time.perf_counter()
        self._begin(seed, greedy)
        try:
            if cfg.independent_turns and self.independent_turns_supported:
                self._run_independent_turns(rows, greedy, timing)
            else:
                self._run_synchronous_turns(rows, greedy, timing)
        finally:
            self._end()
        timing["wall_s"] = time.perf_counter() - start
        timing["tokens_per_s"] = timing["tokens_generated"] / max(timing["generation_s"], 1e-9)
        return self._collate(rows, timing)

    def _run_synchronous_turns(self, rows: list[_Row], greedy: bool, timing: dict) -> None:
        """Every active row takes turn t together; one retrieval call per turn (module docstring)."""
        cfg = self.config
        for turn in range(cfg.max_turns + 1):
            final = turn == cfg.max_turns
            keys = [b for b, row in enumerate(rows) if not row.done and self._room(row, truncate=True) > 0]
            if not keys:
                break
            active = [rows[b] for b in keys]
            timing["turns"] += 1
            limits = [min(cfg.max_response_tokens, self._room(row)) for row in active]
            start = time.perf_counter()
            outputs = self._generate_turn(keys, [row.context() for row in active], limits, greedy)
            timing["generation_s"] += time.perf_counter() - start
            for row, out in zip(active, outputs):
                timing["tokens_generated"] += len(out.ids)
                self._take_turn(row, out, final)
            searching = [row for row in active if row.pending and row.pending[0] == "search"]
            waited = time.perf_counter()
            results = self._retrieve([row.pending[1] for row in searching], timing)
            timing["retrieval_wait_s"] += time.perf_counter() - waited
            for row, passages in zip(searching, results):
                self._record_search(row, passages, turn)
            for row in active:
                self._finish_turn(row, turn)

    def _run_independent_turns(self, rows: list[_Row], greedy: bool, timing: dict) -> None:
        """Each row its own turn loop; searches go to the retrieval queue while other rows decode."""
        # A fresh queue per generate: after a failed one, the old queue may still hold its searches
        # (keyed by row numbers this call reuses) and a pending error; closing it ends its worker.
        queue = RetrievalQueue(self.retriever, self.config.top_k)
        try:
            self._independent_turn_loop(rows, greedy, timing, queue)
        finally:
            queue.close()

    def _independent_turn_loop(self, rows: list[_Row], greedy: bool, timing: dict, queue: RetrievalQueue) -> None:
        cfg = self.config
        decoding, searching = 0, 0

        def start_turn(key: int) -> None:
            nonlocal decoding
            row = rows[key]
            if row.done or row.record.num_turns > cfg.max_turns or self._room(row, truncate=True) <= 0:
                return
            self._submit(key, row.context(), min(cfg.max_response_tokens, self._room(row)), greedy)
            decoding += 1

        for key in range(len(rows)):
            start_turn(key)
        while decoding or searching:
            ended: list[tuple[int, TurnOutput]] = []
            if decoding:
                started = time.perf_counter()
                ended = self._poll()
                timing["generation_s"] += time.perf_counter() - started
                found = queue.take(block=False)
            else:  # nothing to decode: wait for the retriever
                started = time.perf_counter()
                found = queue.take(block=True)
                timing["retrieval_wait_s"] += time.perf_counter() - started
            for key, out in ended:
                decoding -= 1
                row, turn = rows[key], rows[key].record.num_turns
                timing["tokens_generated"] += len(out.ids)
                self._take_turn(row, out, final=turn == cfg.max_turns)
                if row.pending and row.pending[0] == "search":
                    queue.put(key, row.pending[1])
                    searching += 1
                else:
                    self._finish_turn(row, turn)
                    start_turn(key)
            for key, passages in found:
                searching -= 1
                row = rows[key]
                turn = row.record.num_turns - 1
                self._record_search(row, passages, turn)
                self._finish_turn(row, turn)
                start_turn(key)
        timing["turns"] = float(max((row.record.num_turns for row in rows), default=0))
        timing["retrieval_s"], timing["retrieval_calls"] = queue.busy_s, float(queue.calls)

    def _record_search(self, row: _Row, passages: list[Passage], turn: int) -> None:
        row.record.steps.append(SearchStep(
            query=row.pending[1], passage_ids=[p.id for p in passages],
            passage_titles=[p.title for p in passages], passage_texts=[p.text for p in passages],
            end_index=row.pending[2], turn=turn,
        ))
        row.passages = passages

    def _finish_turn(self, row: _Row, turn: int) -> None:
        if row.pending and not row.done:
            self._insert_environment(row, turn)
        row.pending, row.passages = None, None

    def _new_row(self, question: str) -> _Row:
        cfg = self.config
        text = tpl.format_prompt(question, self.tokenizer, cfg.template, cfg.use_chat_template)
        templated = tpl.uses_chat_template(self.tokenizer, cfg.use_chat_template)
        # A chat template already holds any BOS; raw text gets the tokenizer's usual specials.
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        row = _Row(prompt_text=text, prompt_ids=list(ids), length=len(ids))
        row.record = TrajectoryRecord(prompt_text=text, response_text="", answer=None)
        return row

    def _room(self, row: _Row, truncate: bool = False) -> int:
        room = self.config.max_context_tokens - row.length
        if room <= 0 and truncate and not row.done:
            row.done, row.record.truncated = True, True
        return room

    def _take_turn(self, row: _Row, out: TurnOutput, final: bool) -> None:
        """Record the policy's turn and decide what the environment does next (``row.pending``)."""
        record = row.record
        record.num_turns += 1
        start = row.add(out.ids, policy=True, logprobs=out.logprobs)
        action = tpl.parse_action(self._decode(out.ids), self.config.template)
        if action.kind == "answer":
            row.done, record.finished = True, True
            if not record.steps:
                record.invalid_actions.append("answer_without_search")
            return
        if action.kind == "search" and action.invalid is None:
            if final:
                record.invalid_actions.append("search_on_last_turn")
                row.done = True
            elif out.stop == "eos":  # only reachable if a backend missed the stop tag
                record.invalid_actions.append("search_then_eos")
                row.done, record.finished = True, True
            else:
                row.pending = ("search", action.content, start + self._last_token_of(out.ids, action.end))
        else:
            record.invalid_actions.append(action.invalid or "no_action")
            if out.stop == "eos":
                row.done, record.finished = True, True
            elif final:
                row.done = True
            else:
                row.pending = ("invalid",)
        if not row.done and self._room(row) <= 0:  # no room left for what the environment would say
            row.done, record.truncated, row.pending = True, True, None

    def _last_token_of(self, ids: list[int], char_end: int) -> int:
        """Index (within ``ids``) of the token that completes the text up to ``char_end``."""
        index = len(ids) - 1
        while index > 0 and len(self._decode(ids[:index])) >= char_end:
            index -= 1
        return index

    def _retrieve(self, queries: list[str], timing: dict) -> list[list[Passage]]:
        if not queries:
            return []
        start = time.perf_counter()
        results = search_checked(self.retriever, queries, self.config.top_k)
        timing["retrieval_s"] += time.perf_counter() - start
        timing["retrieval_calls"] += 1
        return results

    def _insert_environment(self, row: _Row, turn: int) -> None:
        """Append the observation or the invalid-action warning, plus the last-turn warning on the last
        turn (all loss mask 0), within the context cap."""
        cfg = self.config
        if row.pending[0] == "search":
            ids = self._observation_ids(row.passages)
        else:
            ids = self._encode(tpl.format_warning(tpl.INVALID_ACTION_WARNING))
        if turn == cfg.max_turns - 1:
            warning = tpl.format_warning(tpl.LAST_TURN_WARNING)
            ids += self._encode(warning.lstrip("\n") if ids else warning)
        room = self._room(row)
        if len(ids) >= room:
            ids, row.done, row.record.truncated = ids[:room], True, True
        if ids:
            row.add(ids, policy=False)

    def _observation_ids(self, passages: list[Passage]) -> list[int]:
        """The observation's ids; over ``max_observation_tokens`` the documents are cut, the closing
        tag kept."""
        full = self._encode(tpl.format_observation(passages, self.config.template, self.config.observation_format))
        if len(full) <= self.config.max_observation_tokens:
            return full
        body = self._encode(tpl.format_documents(passages, self.config.observation_format))
        budget = self.config.max_observation_tokens - len(self._obs_head) - len(self._obs_tail)
        return self._obs_head + body[: max(budget, 0)] + self._obs_tail

    def _collate(self, rows: list[_Row], timing: dict) -> Trajectory:
        width = max((row.length for row in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        complete = True  # every policy token has an engine log-prob
        for b, row in enumerate(rows):
            position = len(row.prompt_ids)
            input_ids[b, :position] = torch.tensor(row.prompt_ids, dtype=torch.long)
            response: list[int] = []
            policy_ids: list[int] = []
            for piece, policy, piece_logprobs in row.pieces:
                if piece:
                    input_ids[b, position:position + len(piece)] = torch.tensor(piece, dtype=torch.long)
                    loss_mask[b, position:position + len(piece)] = int(policy)
                    if policy and piece_logprobs is not None and len(piece_logprobs) == len(piece):
                        logprobs[b, position:position + len(piece)] = torch.tensor(piece_logprobs)
                    elif policy:
                        complete = False
                position += len(piece)
                response.extend(piece)
                policy_ids.extend(piece if policy else [])
            attention[b, :position] = 1
            row.record.response_text = self._decode(response, skip_special=True)
            # The answer comes from the policy's own text: retrieved passages may contain anything.
            row.record.answer = tpl.extract_answer(self._decode(policy_ids, skip_special=True))
        prompt_lengths = torch.tensor([len(row.prompt_ids) for row in rows], dtype=torch.long)
        return Trajectory(input_ids, attention, loss_mask, prompt_lengths, [r.record for r in rows], timing,
                          rollout_logprobs=logprobs if complete else None)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models have several)."""
    ids = {tokenizer.eos_token_id}
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)
