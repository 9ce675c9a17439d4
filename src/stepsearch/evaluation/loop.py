"""The one evaluation path: greedy rollouts scored with EM/F1 (SQuAD normalisation, METHOD.md §6).

Validation, test, ``predict`` and ``python -m stepsearch evaluate``/``ask`` all go through
:func:`rollout_and_score` (one greedy rollout batch, scored by :func:`stepsearch.rewards.score_trajectories`,
whose ``answer`` is the single answer extraction of :mod:`stepsearch.rewards.format`) and, for
per-question output, :func:`prediction_rows`. ``EvalAccumulator`` gathers torchmetrics
``ExactMatch``/``TokenF1`` overall, per dataset and per hop count plus reward-side means.

Methods (:func:`method_engine`): ``agent`` is the multi-turn search policy (its rollout limits as
trained); ``direct`` and ``rag`` are the field's baselines, FlashRAG's naive generation and standard
RAG (``SequentialPipeline.naive_run``/``run``, ``flashrag/prompt/base_prompt.py`` at RUC-NLPIR/FlashRAG
1ee5249), reported as "Direct Inference" and "RAG" by Search-R1 and StepSearch:

- the prompt is a system message (:data:`DIRECT_INSTRUCTION`, or :data:`RAG_INSTRUCTION` with the top
  :data:`RAG_TOP_K` passages retrieved with the question, written ``Doc {i}(Title: {title}) {text}``
  from the passage's ``contents`` as FlashRAG's ``format_reference`` does) and a user message
  ``Question: {question}``, through the tokenizer's chat template when it has one (FlashRAG decides by
  "chat"/"instruct" in the model name), else the two joined by a blank line (FlashRAG's fallback);
- one greedy generation of at most :data:`BASELINE_MAX_NEW_TOKENS` tokens (FlashRAG's ``max_tokens:
  32``), through the same rollout backend as the agent (:func:`stepsearch.rollout.factory.build_engine`);
- the answer is the generated text up to its first line break (leading whitespace dropped), scored
  with the same EM/F1. Departure: FlashRAG scores the whole generation; a chat model that answers
  and then explains would otherwise lose every EM point for the explanation.

The instruction texts are FlashRAG's byte for byte, including "document.Only" (no space: two string
literals joined in its source). Where Search-R1 differs (its own direct/RAG prompts ask to "answer
... with one or few words" and its retrieval gives the top 3), this follows FlashRAG (top 5).

Per-dataset metrics are created on first sight of a dataset; under DDP every rank must see the
same dataset names (true when the validation split is sharded, not partitioned by dataset).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from stepsearch.errors import StepSearchError
from stepsearch.rollout.retrieval_queue import search_checked
from stepsearch.rollout.seeding import row_seed
from stepsearch.rollout.template import uses_chat_template
from stepsearch.rollout.trajectory import SearchStep, TrajectoryRecord

METHODS = ("agent", "rag", "direct")


class EvalAccumulator:
    """Running EM/F1 (overall, per dataset and per hop count), reward, answer F1, format-valid rate, searches.

    ``reward`` is the training reward of the run's algorithm (StePPO adds the search-key term to
    the answer F1; PPO does not), so it does not compare across algorithms; ``answer_f1`` does.
    Hop counts come from the examples' sub-questions (multi-hop data with decompositions and the
    synthetic world); examples without them are not counted per hop. Under DDP the per-hop metrics
    are not synced (a rank's shard may lack a hop count, and a collective only some ranks join
    would hang): like ``reward``, they are rank 0's share.
    """
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reset()

    def to(self, device: torch.device | str) -> EvalAccumulator:
        """Keep metric states on ``device``: under multi-GPU (NCCL) their sync needs CUDA tensors."""
        self.device = torch.device(device)
        for metric in self._metrics():
            metric.to(self.device)
        return self

    def _metrics(self):
        yield self.em
        yield self.f1
        for pair in (*self.per_dataset.values(), *self.per_hops.values()):
            yield from pair

    def _new_pair(self, **kwargs) -> tuple:
        from stepsearch.evaluation.metrics import ExactMatch, TokenF1  # lazy: loads torchmetrics

        return ExactMatch(**kwargs).to(self.device), TokenF1(**kwargs).to(self.device)

    def reset(self) -> None:
        self.em, self.f1 = self._new_pair()
        self.per_dataset: dict[str, tuple] = {}
        self.per_hops: dict[int, tuple] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.samples = None

    def update(self, examples, trajectory, scores) -> None:
        preds = [score.answer or "" for score in scores]  # the one answer extraction (rewards.format)
        golds = [ex.answers for ex in examples]
        self.em.update(preds, golds)
        self.f1.update(preds, golds)
        for ex, pred in zip(examples, preds):
            name = ex.dataset or "default"
            if name not in self.per_dataset:
                self.per_dataset[name] = self._new_pair()
            pairs = [self.per_dataset[name]]
            hops = len(ex.sub_questions or [])
            if hops:
                if hops not in self.per_hops:
                    self.per_hops[hops] = self._new_pair(sync_on_compute=False)
                pairs.append(self.per_hops[hops])
            for em, f1 in pairs:
                em.update([pred], [ex.answers])
                f1.update([pred], [ex.answers])
        for rec, score in zip(trajectory.records, scores):
            self.sums["reward"] += score.global_score
            self.sums["answer_f1"] += score.answer_f1
            self.sums["format_ok"] += float(score.format_ok)
            self.sums["searches"] += len(rec.steps)
        self.count += len(examples)

    def compute(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            return {}
        out = {f"{prefix}/em": float(self.em.compute()), f"{prefix}/f1": float(self.f1.compute())}
        for key, total in self.sums.items():
            out[f"{prefix}/{key}"] = total / self.count
        if len(self.per_dataset) > 1 or next(iter(self.per_dataset), "default") != "default":
            for name, (em, f1) in sorted(self.per_dataset.items()):
                out[f"{prefix}/{name}/em"] = float(em.compute())
                out[f"{prefix}/{name}/f1"] = float(f1.compute())
        if len(self.per_hops) > 1:  # one hop count alone would repeat the overall numbers
            for hops, (em, f1) in sorted(self.per_hops.items()):
                out[f"{prefix}/hops_{hops}/em"] = float(em.compute())
                out[f"{prefix}/hops_{hops}/f1"] = float(f1.compute())
        return out


def rollout_and_score(engine, examples, reward_config):
    """One greedy rollout batch over ``examples`` and its scores: ``(trajectory, scores)``; for a
    :class:`Baseline`, its :class:`BaselineBatch` and first-line scores."""
    from stepsearch.rewards import score_trajectories  # lazy: loads transformers

    if isinstance(engine, Baseline):
        batch = engine.run(examples)
        return batch, engine.score(examples, batch)
    trajectory = engine.generate([ex.question for ex in examples], greedy=True)
    return trajectory, score_trajectories(trajectory.records, examples, reward_config)


def prediction_rows(examples, trajectory, scores) -> list[dict]:
    """One JSON-ready row per question: enough to re-score it by hand (golds, prediction, searches)."""
    rows = []
    for ex, rec, score in zip(examples, trajectory.records, scores):
        rows.append({
            "id": ex.id, "dataset": ex.dataset, "question": ex.question, "answers": list(ex.answers),
            "prediction": score.answer, "em": score.answer_em, "f1": score.answer_f1,
            "format_ok": score.format_ok,
            "searches": [{"query": s.query, "ids": s.passage_ids, "titles": s.passage_titles} for s in rec.steps],
            "invalid_actions": list(rec.invalid_actions), "response": rec.response_text,
        })
    return rows


def evaluate_examples(engine, examples, reward_config, batch_size: int = 16, progress=None):
    """Greedy rollouts over ``examples`` in batches: ``(EvalAccumulator, prediction rows)``."""
    acc = EvalAccumulator()
    rows: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        trajectory, scores = rollout_and_score(engine, chunk, reward_config)
        acc.update(chunk, trajectory, scores)
        rows.extend(prediction_rows(chunk, trajectory, scores))
        if progress is not None:
            progress(len(chunk))
    return acc, rows


DIRECT_INSTRUCTION = ("Answer the question based on your own knowledge. Only give me the answer and do not "
                      "output any other words.")
RAG_INSTRUCTION = ("Answer the question based on the given document."
                   "Only give me the answer and do not output any other words."
                   "\nThe following are given documents.\n\n{reference}")  # FlashRAG's, "document.Only" included
USER_PROMPT = "Question: {question}"
RAG_TOP_K = 5  # FlashRAG's retrieval_topk
BASELINE_MAX_NEW_TOKENS = 32  # FlashRAG's generation max_tokens


def format_reference(passages) -> str:
    """FlashRAG's ``format_reference``: the title is the first line of ``contents`` (quotes kept)."""
    lines = []
    for index, passage in enumerate(passages):
        title, _, text = passage.contents.partition("\n")
        lines.append(f"Doc {index + 1}(Title: {title}) {text}\n")
    return "".join(lines)


def baseline_prompt(question: str, tokenizer, passages=None, use_chat_template: bool | None = None) -> str:
    """The prompt text of ``direct`` (``passages`` None) or ``rag`` for one question (module docstring)."""
    system = DIRECT_INSTRUCTION if passages is None else RAG_INSTRUCTION.format(reference=format_reference(passages))
    user = USER_PROMPT.format(question=question)
    if uses_chat_template(tokenizer, use_chat_template):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user}"


def first_line(text: str) -> str:
    """The answer of a baseline: the generated text up to its first line break, stripped."""
    return text.strip().split("\n", 1)[0].strip()


@dataclass
class BaselineBatch:
    """What a baseline produced for a batch: one record per question (``answer`` = its first line)."""
    records: list
    timing: dict


class Baseline:
    """``direct`` or ``rag`` on a rollout engine's backend: one prompt, one short greedy generation."""
    def __init__(self, method: str, engine, top_k: int = RAG_TOP_K, max_new_tokens: int = BASELINE_MAX_NEW_TOKENS):
        self.method, self.engine, self.top_k, self.max_new_tokens = method, engine, top_k, max_new_tokens

    def prompts(self, questions: list[str]) -> tuple[list[str], list[list]]:
        """(prompt texts, retrieved passages per question; empty lists for ``direct``)."""
        engine = self.engine
        if self.method == "rag":
            found = search_checked(engine.retriever, list(questions), self.top_k)
        else:
            found = [[] for _ in questions]
        texts = [baseline_prompt(q, engine.tokenizer, p if self.method == "rag" else None,
                                 engine.config.use_chat_template) for q, p in zip(questions, found)]
        return texts, found

    def run(self, examples) -> BaselineBatch:

        engine, started = self.engine, time.perf_counter()
        texts, found = self.prompts([ex.question for ex in examples])
        contexts = [self._prompt_ids(text) for text in texts]
        keys = list(range(len(examples)))
        # The backend's one-turn hooks (TurnLoopEngine): greedy, so the row seeds draw nothing.
        engine.row_seeds = [row_seed(0, key) for key in keys]
        engine._begin(0, True)
        try:
            outputs = engine._generate_turn(keys, contexts, [self.max_new_tokens] * len(keys), True)
        finally:
            engine._end()
        records = []
        for ex, text, passages, out in zip(examples, texts, found, outputs):
            response = engine.tokenizer.decode(out.ids, skip_special_tokens=True)
            steps = [SearchStep(query=ex.question, passage_ids=[p.id for p in passages],
                                passage_titles=[p.title for p in passages], passage_texts=[p.text for p in passages],
                                end_index=0)] if self.method == "rag" else []
            records.append(TrajectoryRecord(prompt_text=text, response_text=response, answer=first_line(response),
                                            steps=steps, num_turns=1, finished=out.stop == "eos"))
        return BaselineBatch(records, {"wall_s": time.perf_counter() - started})

    def _prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids (a chat template holds its specials); over the context cap, FlashRAG's cut:
        the first and the last halves of the allowed length."""
        engine = self.engine
        templated = uses_chat_template(engine.tokenizer, engine.config.use_chat_template)
        ids = list(engine.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        limit = engine.config.max_context_tokens - self.max_new_tokens
        if len(ids) > limit:
            half = max(limit // 2, 1)
            ids = ids[:half] + ids[-(limit - half):]
        return ids

    def score(self, examples, batch: BaselineBatch) -> list:
        """EM/F1 of each first-line answer (``format_ok``: there is no protocol, always True)."""
        from stepsearch.evaluation.metrics import exact_match_score, f1_score  # lazy: loads torchmetrics
        from stepsearch.rewards.scoring import TrajectoryScore  # lazy: loads transformers

        scores = []
        for ex, record in zip(examples, batch.records):
            f1 = f1_score(record.answer, ex.answers)
            scores.append(TrajectoryScore(format_ok=True, answer=record.answer, answer_f1=f1,
                                          answer_em=exact_match_score(record.answer, ex.answers), key_score=0.0,
                                          global_score=f1, num_searches=len(record.steps)))
        return scores


def method_engine(method: str, engine, **baseline_options):
    """What runs an evaluation method on a rollout engine (one built by
    :func:`stepsearch.rollout.factory.build_engine`): the engine itself for ``agent``, a
    :class:`Baseline` on it for ``direct`` and ``rag`` (module docstring)."""
    if method == "agent":
        return engine
    if method in ("direct", "rag"):
        return Baseline(method, engine, **baseline_options)
    raise StepSearchError(f"unknown evaluation method {method!r}: use one of {', '.join(METHODS)}")
