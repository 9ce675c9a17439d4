"""The one evaluation path: greedy rollouts scored with EM/F1 (SQuAD normalisation, METHOD.md §6).

Validation, test, ``predict`` and ``python -m stepsearch evaluate``/``ask`` all go through
:func:`rollout_and_score` (one greedy rollout batch, scored by :func:`stepsearch.rewards.score_trajectories`,
whose ``answer`` is the single answer extraction of :mod:`stepsearch.rewards.format`) and, for
per-question output, :func:`prediction_rows`. ``EvalAccumulator`` gathers torchmetrics
``ExactMatch``/``TokenF1`` overall, per dataset and per hop count plus reward-side means.

Methods (:func:`method_engine`), after Search-R1's baselines:

- ``agent``: the multi-turn search policy, its rollout limits as trained.
- ``rag``: one retrieval with the question, then one answer. Departure from Search-R1 (which puts
  the passages in a separate RAG prompt): the retrieval is written into the agent's own protocol
  (``<search> question </search>`` then ``<information>``, with the last-turn notice) and the model
  answers from there, so a policy trained on that protocol (and a tiny one) can read its documents.
- ``direct``: the same prompt, one generation, no retrieval (``max_turns = 0``); a search there ends
  the trajectory unanswered (``search_on_last_turn``), which is scored like any wrong answer.

Per-dataset metrics are created on first sight of a dataset; under DDP every rank must see the
same dataset names (true when the validation split is sharded, not partitioned by dataset).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch

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
        from stepsearch.evaluation.metrics import ExactMatch, TokenF1

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
    """One greedy rollout batch over ``examples`` and its scores: ``(trajectory, scores)``."""
    from stepsearch.rewards import score_trajectories

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


class _QuestionSearchedFirst:
    """Mixin for a turn-loop engine: every row's first turn is ``<search> {question} </search>``,
    written for the model (not generated); the engine then retrieves and inserts ``<information>``
    exactly as for a search the model wrote."""

    _first_queries: list[str] | None = None

    def generate(self, questions, *, greedy=False, seed=None, row_keys=None):
        self._first_queries = [" ".join(q.split()) for q in questions]
        return super().generate(questions, greedy=greedy, seed=seed, row_keys=row_keys)

    def _generate_turn(self, keys, contexts, max_new, greedy):
        from stepsearch.rollout.decoding import TurnOutput

        if self._first_queries is not None:
            queries, self._first_queries = self._first_queries, None
            return [TurnOutput(self._encode(f"<search> {queries[k]} </search>"), "tag") for k in keys]
        return super()._generate_turn(keys, contexts, max_new, greedy)


def method_engine(method: str, model, tokenizer, retriever, rollout_config):
    """The rollout engine of an evaluation method (``agent``, ``rag``, ``direct``; module docstring)."""
    from stepsearch.errors import StepSearchError
    from stepsearch.rollout.hf_engine import HFRolloutEngine

    if method == "agent":
        return HFRolloutEngine(model, tokenizer, retriever, rollout_config)
    if method == "direct":
        return HFRolloutEngine(model, tokenizer, retriever, replace(rollout_config, max_turns=0))
    if method == "rag":
        engine_class = type("RetrieveOnceEngine", (_QuestionSearchedFirst, HFRolloutEngine), {})
        return engine_class(model, tokenizer, retriever, replace(rollout_config, max_turns=1))
    raise StepSearchError(f"unknown evaluation method {method!r}: use one of {', '.join(METHODS)}")
