"""Evaluation: greedy rollouts scored with EM/F1 (SQuAD normalisation, METHOD.md §6).

``EvalAccumulator`` gathers torchmetrics ``ExactMatch``/``TokenF1`` overall and per dataset plus
reward-side means; the module uses it for validation/test and the step-0 pass. ``python -m
stepsearch evaluate`` runs the same loop over QA files with any model and retriever and prints a
table per dataset (optionally writing predictions as JSONL).

Per-dataset metrics are created on first sight of a dataset; under DDP every rank must see the
same dataset names (true when the validation split is sharded, not partitioned by dataset).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


class EvalAccumulator:
    """Running EM/F1 (overall, per dataset and per hop count), reward, format-valid rate, searches.

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

    def _new_em(self, **kwargs):
        from stepsearch.metrics import ExactMatch

        return ExactMatch(**kwargs).to(self.device)

    def _new_f1(self, **kwargs):
        from stepsearch.metrics import TokenF1

        return TokenF1(**kwargs).to(self.device)

    def reset(self) -> None:
        self.em, self.f1 = self._new_em(), self._new_f1()
        self.per_dataset: dict[str, tuple] = {}
        self.per_hops: dict[int, tuple] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.samples = None

    def update(self, examples, trajectory, scores) -> None:
        preds = [score.answer or "" for score in scores]  # the reward's own parse: env blocks stripped
        golds = [ex.answers for ex in examples]
        self.em.update(preds, golds)
        self.f1.update(preds, golds)
        for ex, pred in zip(examples, preds):
            name = ex.dataset or "default"
            if name not in self.per_dataset:
                self.per_dataset[name] = (self._new_em(), self._new_f1())
            em, f1 = self.per_dataset[name]
            em.update([pred], [ex.answers])
            f1.update([pred], [ex.answers])
            hops = len(ex.sub_questions or [])
            if hops:
                if hops not in self.per_hops:
                    self.per_hops[hops] = (self._new_em(sync_on_compute=False), self._new_f1(sync_on_compute=False))
                em, f1 = self.per_hops[hops]
                em.update([pred], [ex.answers])
                f1.update([pred], [ex.answers])
        for rec, score in zip(trajectory.records, scores):
            self.sums["reward"] += score.global_score
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


def evaluate_examples(engine, examples, reward_config, batch_size: int = 16, progress=None):
    """Greedy rollouts over ``examples``; returns (metrics by prefix "eval", prediction rows)."""
    from stepsearch.rewards import score_trajectories

    acc = EvalAccumulator()
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        trajectory = engine.generate([ex.question for ex in chunk], greedy=True)
        scores = score_trajectories(trajectory.records, chunk, reward_config)
        acc.update(chunk, trajectory, scores)
        for ex, rec, score in zip(chunk, trajectory.records, scores):
            rows.append({"id": ex.id, "dataset": ex.dataset, "question": ex.question, "answers": ex.answers,
                         "prediction": score.answer, "em": score.answer_em, "f1": score.answer_f1,
                         "searches": [s.query for s in rec.steps], "response": rec.response_text})
        if progress is not None:
            progress(len(chunk))
    return acc.compute("eval"), rows


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="policy: Hugging Face id or local directory")
    parser.add_argument("--data", required=True, nargs="+", help="QA files (any supported format)")
    parser.add_argument("--index", help="retrieval index directory (BM25 or dense)")
    parser.add_argument("--url", help="remote retrieval service URL instead of --index")
    parser.add_argument("--limit", type=int, default=None, help="first N examples per file")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", default="think", choices=["think", "plan", "compact"])
    parser.add_argument("--max-turns", type=int, default=5)
    parser.add_argument("--output", help="write one JSONL prediction row per example")
    parser.add_argument("--dtype", default="float32")


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from stepsearch.data.sources import load_examples
    from stepsearch.errors import StepSearchError
    from stepsearch.models.loading import load_policy
    from stepsearch.retrieval.factory import RetrieverConfig, build_retriever
    from stepsearch.rewards import RewardConfig
    from stepsearch.rollout.engine import HFRolloutEngine, RolloutConfig

    if not (args.index or args.url):
        raise StepSearchError("evaluate needs a retriever: pass --index DIR or --url http://host:port")
    examples = []
    for path in args.data:
        loaded = load_examples(path)
        examples.extend(loaded[: args.limit] if args.limit else loaded)
    retriever = build_retriever(RetrieverConfig(kind="http", url=args.url) if args.url else RetrieverConfig(index=args.index))
    model, tokenizer = load_policy(args.model, dtype=args.dtype)
    engine = HFRolloutEngine(model, tokenizer, retriever, RolloutConfig(template=args.template, max_turns=args.max_turns))
    with Progress(transient=True) as progress:
        task = progress.add_task("evaluating", total=len(examples))
        metrics, rows = evaluate_examples(engine, examples, RewardConfig(), args.batch_size,
                                          progress=lambda n: progress.advance(task, n))
    table = Table(title=f"{args.model}: greedy EM/F1")
    for column in ("dataset", "n", "EM", "F1"):
        table.add_column(column)
    by_dataset = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"] or "default"].append(row)
    for name, items in sorted(by_dataset.items()):
        table.add_row(name, str(len(items)), f"{sum(r['em'] for r in items) / len(items):.3f}",
                      f"{sum(r['f1'] for r in items) / len(items):.3f}")
    table.add_row("all", str(len(rows)), f"{metrics['eval/em']:.3f}", f"{metrics['eval/f1']:.3f}")
    Console().print(table)
    if args.output:
        with open(args.output, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return 0
