"""``python -m stepsearch evaluate``: the paper's benchmark table; ``ask``: one question, turn by turn.

A suite (YAML via ``--suite`` and/or flags) names benchmarks (files in any layout
:mod:`stepsearch.data.sources` reads), a retriever (``index`` or ``url``), models and methods
(``agent``, ``rag``, ``direct``: :mod:`stepsearch.evaluation.loop`) and the sampling rule: the first
``sample`` rows, or ``sample`` rows drawn with ``seed`` (the paper: up to 520, seed 630). The output
is one row per (method, model), an (EM, F1) pair per benchmark and their unweighted average, printed,
written as ``table.md``/``table.csv``, and logged to MLflow (``test/<benchmark>/em|f1`` per
method/model run, the table as an artifact); ``predictions/<method>-<model>.jsonl`` holds one row per
question (question, golden answers, prediction, searches with retrieved ids), which re-score to
the table. Rows without golden answers are skipped by the reader and counted in the table notes.

The policy's template and rollout limits come from ``stepsearch_policy.json`` beside an exported
policy (written at the end of ``fit``); flags override them.

Example suite::

    benchmarks: {hotpotqa: /work/shared/data/raw/hotpot_dev_distractor_sample.json, bamboogle: ...}
    index: runs/quickstart/world/index
    models: {steppo: runs/quickstart/policy}
    methods: [direct, rag, agent]
    sample: 520
    seed: 630
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

from stepsearch.arguments import positive_int
from stepsearch.commands.benchmark_table import format_table, mlflow_log, print_table
from stepsearch.data.schema import Example
from stepsearch.data.sources import FORMATS, read_examples
from stepsearch.errors import StepSearchError
from stepsearch.progress import Progress
from stepsearch.records.policy_card import POLICY_CARD
from stepsearch.records.store import check_store, check_writable
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever, load_retriever


@dataclass
class Suite:
    """What ``evaluate`` runs (YAML keys = field names)."""
    benchmarks: dict = field(default_factory=dict)  # name -> path, or {path, format, split}
    models: dict = field(default_factory=dict)  # name -> path or hub id
    methods: list = field(default_factory=lambda: ["agent"])
    index: str | None = None
    url: str | None = None
    sample: int | None = None  # rows per benchmark (None: all)
    seed: int | None = None  # None: the first `sample` rows; else `sample` rows drawn with this seed
    batch_size: int = 16
    dtype: str = "float32"
    output_dir: str = "runs/eval"
    experiment: str = "evaluation"  # MLflow experiment ("" disables MLflow)
    log_to_policy_run: bool = False  # also log test/... metrics into the run that trained the policy
    rollout: dict = field(default_factory=dict)  # RolloutConfig overrides (template, max_turns, ...)


def load_suite(path: str | None, overrides: dict) -> Suite:
    """The suite from ``path`` (YAML) with flag ``overrides`` on top; one-line errors for bad keys."""
    raw: dict = {}
    if path:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except UnicodeDecodeError as err:
            raise StepSearchError(f"suite {path}: not a text file (byte {err.start} is not UTF-8); expected a suite YAML") from None
        except (OSError, yaml.YAMLError) as err:
            raise StepSearchError(f"suite {path}: cannot read it as YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise StepSearchError(f"suite {path}: expected a mapping of suite keys, got {type(raw).__name__}")
        known = {f.name for f in fields(Suite)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StepSearchError(f"suite {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key, value in overrides.items():  # flags replace the suite's value; rollout overrides merge
        if key == "rollout":
            raw[key] = {**(raw.get(key) or {}), **value}
        elif value not in (None, {}):
            raw[key] = value
    suite = Suite(**raw)
    if isinstance(suite.models, list):
        suite.models = {Path(str(m)).name or str(m): str(m) for m in suite.models}
    if not suite.benchmarks:
        raise StepSearchError("evaluate: no benchmarks (pass --benchmark NAME=FILE or a suite YAML with benchmarks:)")
    if not suite.models:
        raise StepSearchError("evaluate: no model (pass --model [NAME=]PATH or a suite YAML with models:)")

    from stepsearch.evaluation.loop import METHODS  # lazy: loads torch

    bad = [m for m in suite.methods if m not in METHODS]
    if bad:
        raise StepSearchError(f"evaluate: unknown method(s) {', '.join(bad)}; use {', '.join(METHODS)}")
    for path in suite.models.values():
        check_model_source(str(path))
    return suite


def check_model_source(path: str) -> None:
    """One line for a model path that is no directory and cannot be a hub id (``name``, ``org/name``):
    more than one ``/``, a leading ``.``, ``/`` or ``~``, or a parent folder that exists."""
    where = Path(path).expanduser()
    if where.exists() or where.suffix.lower() == ".gguf":
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or (path.count("/") == 1 and where.parent.is_dir()):
        raise StepSearchError(f"model {path}: no such model directory")


def _pairs(values: list[str] | None, what: str) -> dict:
    out = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:  # a file's stem; a policy directory's name (its run's, for an exported ".../policy")
            where = Path(value)
            name = where.stem if what == "benchmark" else (where.parent.name if where.name == "policy" else where.name)
            name, path = name or value, value
        out[name] = path
    return out


def sample_examples(examples: list, n: int | None, seed: int | None) -> list:
    """The first ``n`` examples (``seed`` None), or ``n`` drawn without replacement with ``seed``,
    kept in file order; all when ``n`` is None or at least their number."""
    if n is None or n >= len(examples):
        return list(examples)
    if seed is None:
        return list(examples[:n])
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


def read_benchmark(name: str, spec) -> tuple[list, int]:
    """(examples, rows skipped by the reader) of one benchmark; ``Example.dataset`` set to ``name``."""
    spec = spec if isinstance(spec, dict) else {"path": spec}
    if "path" not in spec:
        raise StepSearchError(f"benchmark {name}: give a path (benchmarks: {{{name}: FILE}})")
    if not Path(str(spec["path"])).exists():
        raise StepSearchError(f"benchmark {name}: {spec['path']} does not exist")
    result = read_examples(spec["path"], format=spec.get("format"), split=spec.get("split"), dataset=name)
    return result.examples, len(result.skipped)


def policy_rollout(model_path: str, overrides: dict):
    """The RolloutConfig the policy was trained with (its ``stepsearch_policy.json``), then ``overrides``;
    and the card itself ({} without one)."""
    from stepsearch.rollout.engine import RolloutConfig  # lazy: loads torch

    card_path = Path(model_path) / POLICY_CARD
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StepSearchError(f"{card_path}: unreadable policy card ({err}); re-export the policy or "
                                  "delete the file and pass the rollout settings as flags") from None
    else:
        card = _card_from_run(model_path)
    known = {f.name for f in fields(RolloutConfig)}
    settings = {k: v for k, v in (card.get("rollout") or {}).items() if k in known}
    bad = sorted(set(overrides) - known)
    if bad:
        raise StepSearchError(f"rollout override(s) {', '.join(bad)} unknown; known: {', '.join(sorted(known))}")
    return RolloutConfig(**{**settings, **overrides}), card


def _card_from_run(model_path: str) -> dict:
    """Without a card: the rollout params of the MLflow run whose tag ``policy_dir`` is this directory."""
    if not Path(model_path).is_dir():
        return {}
    import mlflow

    from stepsearch.records.tracking import default_tracking_uri  # lazy: loads lightning

    uri = default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return {}  # no store yet: looking would create one (an empty mlflow.db) as a side effect
    path = str(Path(model_path).resolve()).replace("'", "\\'")
    try:
        client = mlflow.MlflowClient(uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.policy_dir = '{path}'", max_results=1) if ids else []
    except Exception:  # an unreachable or foreign store only means: no record of this policy
        return {}
    if not runs:
        return {}
    prefix = "model.rollout."
    rollout = {k[len(prefix):]: yaml_value(v) for k, v in runs[0].data.params.items() if k.startswith(prefix)}
    return {"rollout": rollout, "run_id": runs[0].info.run_id, "tracking_uri": uri}


def yaml_value(text: str):
    """A logged param back to its value (params are strings: ``'5'``, ``'0.6'``, ``'None'``, ``'compact'``)."""
    import yaml

    return None if text == "None" else yaml.safe_load(text)


def build_suite_retriever(suite: Suite):
    if suite.url:
        return build_retriever(RetrieverConfig(kind="http", url=suite.url)), None
    if not suite.index:
        raise StepSearchError("evaluate needs a retriever: --index DIR or --url http://host:port (or index: in the suite)")
    from stepsearch.retrieval.index import read_index_meta  # lazy: loads numpy

    meta = read_index_meta(suite.index)  # one-line RetrievalError for a missing or non-index directory
    return load_retriever(suite.index), meta


def run_suite(suite: Suite) -> tuple[list[dict], str]:
    """Evaluate every (method, model) on every benchmark; write the table and predictions; return
    (rows, Markdown)."""
    from rich.console import Console

    from stepsearch.evaluation.loop import evaluate_examples, method_engine  # lazy: loads torch
    from stepsearch.models.loading import load_policy  # lazy: loads transformers
    from stepsearch.rewards import RewardConfig  # lazy: loads transformers
    from stepsearch.rollout.factory import build_engine  # lazy: loads torch

    console = Console()
    out_dir = Path(suite.output_dir)
    from stepsearch.records.tracking import default_tracking_uri  # lazy: loads lightning

    check_writable(out_dir, "evaluate --output-dir")  # before hours of evaluation, not after
    if suite.experiment:
        check_store(default_tracking_uri())
    (out_dir / "predictions").mkdir(parents=True, exist_ok=True)
    benchmarks, notes = {}, []
    for name, spec in suite.benchmarks.items():
        examples, skipped = read_benchmark(name, spec)
        chosen = sample_examples(examples, suite.sample, suite.seed)
        benchmarks[name] = chosen
        rule = "all" if suite.sample is None else (f"first {suite.sample}" if suite.seed is None else f"{suite.sample} sampled, seed {suite.seed}")
        note = f"{name}: {len(chosen)} questions ({rule})"
        notes.append(note + (f"; {skipped} rows skipped by the reader (no golden answer or unreadable)" if skipped else ""))
    retriever, _ = build_suite_retriever(suite)
    rows = []
    for model_name, model_path in suite.models.items():
        config, card = policy_rollout(model_path, suite.rollout)
        model, tokenizer = load_policy(model_path, dtype=suite.dtype)
        engine = build_engine(config, model, tokenizer, retriever, model_path=model_path)  # rollout.backend
        for method in suite.methods:
            runner = method_engine(method, engine)
            row = {"method": method, "model": model_name, "scores": {}}
            predictions = out_dir / "predictions" / f"{method}-{model_name}.jsonl"
            with predictions.open("w") as handle:
                for name, examples in benchmarks.items():  # a plain line every N s when not on a terminal
                    with Progress(f"{method} {model_name} {name}", len(examples), unit="question") as progress:
                        acc, preds = evaluate_examples(runner, examples, RewardConfig(), suite.batch_size,
                                                       progress=progress.advance)
                    metrics = acc.compute("test")
                    row["scores"][name] = {"em": metrics.get("test/em", 0.0), "f1": metrics.get("test/f1", 0.0),
                                           "n": len(examples), "searches": metrics.get("test/searches", 0.0)}
                    for pred in preds:
                        handle.write(json.dumps({**pred, "method": method, "model": model_name, "benchmark": name}) + "\n")
            row["avg_em"] = sum(s["em"] for s in row["scores"].values()) / len(row["scores"])
            row["avg_f1"] = sum(s["f1"] for s in row["scores"].values()) / len(row["scores"])
            rows.append((row, card, predictions))
    md, csv = format_table([r for r, _, _ in rows], list(benchmarks), notes)
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.csv").write_text(csv)
    print_table([r for r, _, _ in rows], list(benchmarks), notes, console)
    if suite.experiment:
        for row, card, predictions in rows:
            mlflow_log(suite, row, card, md, csv, predictions)
    console.print(f"table: {out_dir / 'table.md'}, {out_dir / 'table.csv'}; predictions: {out_dir / 'predictions'}")
    return [r for r, _, _ in rows], md


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", help="suite YAML (benchmarks, models, methods, index, sample, seed, ...)")
    parser.add_argument("--benchmark", action="append", metavar="[NAME=]FILE", help="a benchmark file (repeatable)")

    parser.add_argument("--format", choices=FORMATS, help="layout of the benchmark files whose layout is not "
                        "detected (every benchmark without a format: key in the suite); default: detected")
    parser.add_argument("--model", action="append", metavar="[NAME=]PATH", help="a policy directory or hub id (repeatable)")
    parser.add_argument("--method", nargs="+", choices=["agent", "rag", "direct"], help="methods (default: agent)")
    parser.add_argument("--index", help="retrieval index directory (BM25 or dense)")
    parser.add_argument("--url", help="remote retrieval service URL instead of --index")
    parser.add_argument("--sample", type=positive_int, help="questions per benchmark (paper: 520)")
    parser.add_argument("--seed", type=int, help="draw --sample questions with this seed (paper: 630); without it, the first N")
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--output-dir", help="where table.md, table.csv and predictions/ go (default runs/eval)")
    parser.add_argument("--experiment", help="MLflow experiment ('' to skip MLflow; default 'evaluation')")
    parser.add_argument("--log-to-policy-run", action="store_true", default=None,
                        help="also log the metrics and table into the MLflow run that trained the policy")
    parser.add_argument("--template", help="override the policy's template (default: as trained)")
    parser.add_argument("--max-turns", type=int, help="override the policy's max_turns (default: as trained)")
    parser.add_argument("--dtype")


def run_evaluate(args: argparse.Namespace) -> int:
    rollout = {k: v for k, v in {"template": args.template, "max_turns": args.max_turns}.items() if v is not None}
    suite = load_suite(args.suite, {
        "benchmarks": _pairs(args.benchmark, "benchmark"), "models": _pairs(args.model, "model"),
        "methods": args.method, "index": args.index, "url": args.url, "sample": args.sample, "seed": args.seed,
        "batch_size": args.batch_size, "output_dir": args.output_dir, "experiment": args.experiment,
        "log_to_policy_run": args.log_to_policy_run, "dtype": args.dtype, "rollout": rollout,
    })
    if args.format:
        suite.benchmarks = {name: {"format": args.format, **(spec if isinstance(spec, dict) else {"path": spec})}
                            for name, spec in suite.benchmarks.items()}
    run_suite(suite)
    return 0


def configure_ask(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question")
    parser.add_argument("--model", required=True, help="policy directory or hub id")
    parser.add_argument("--index", help="retrieval index directory")
    parser.add_argument("--url", help="remote retrieval service URL instead of --index")
    parser.add_argument("--method", default="agent", choices=["agent", "rag", "direct"])
    parser.add_argument("--template", help="override the policy's template (default: as trained)")
    parser.add_argument("--max-turns", type=int, help="override the policy's max_turns")
    parser.add_argument("--dtype", default="float32")


def run_ask(args: argparse.Namespace) -> int:
    from rich.console import Console

    from stepsearch.evaluation.loop import method_engine, rollout_and_score  # lazy: loads torch
    from stepsearch.models.loading import load_policy  # lazy: loads transformers
    from stepsearch.rewards import RewardConfig  # lazy: loads transformers
    from stepsearch.rollout.factory import build_engine  # lazy: loads torch

    if not args.index and not args.url:
        raise StepSearchError("ask needs --index DIR (a BM25 or dense index) or --url http://host:port (a retrieval service)")
    check_model_source(args.model)
    suite = Suite(index=args.index, url=args.url)
    retriever, _ = build_suite_retriever(suite)
    overrides = {k: v for k, v in {"template": args.template, "max_turns": args.max_turns}.items() if v is not None}
    config, _ = policy_rollout(args.model, overrides)
    model, tokenizer = load_policy(args.model, dtype=args.dtype)
    engine = method_engine(args.method, build_engine(config, model, tokenizer, retriever, model_path=args.model))
    example = Example(id="ask", question=args.question, answers=[""])
    trajectory, scores = rollout_and_score(engine, [example], RewardConfig())
    console = Console(soft_wrap=True)  # one turn per line, however long
    console.print(f"[bold]question[/]: {args.question}")
    for line in trajectory_lines(trajectory.records[0]):
        console.print(line, markup=False, highlight=False)
    console.print(f"[bold]answer[/]: {scores[0].answer if scores[0].answer is not None else '(none)'}"
                  f"   [dim]format {'valid' if scores[0].format_ok else 'invalid'}; "
                  f"{len(trajectory.records[0].steps)} searches[/]")
    return 0


def trajectory_lines(record) -> list[str]:
    """The response cut into turns: the model's text per turn, and each search's retrieved titles."""
    from stepsearch.rewards import strip_environment_blocks  # lazy: loads transformers

    lines, steps = [], iter(record.steps)
    if record.steps and "</search>" not in record.response_text:  # rag: retrieved with the question, then the answer
        lines.append(f"  retrieved: {' | '.join(f'{t} ({i})' for t, i in zip(record.steps[0].passage_titles, record.steps[0].passage_ids))}")
    text = strip_environment_blocks(record.response_text)
    turns = [t for t in (piece.strip() for piece in text.replace("</search>", "</search>\x00").split("\x00")) if t]
    for turn, chunk in enumerate(turns):
        lines.append(f"turn {turn + 1}: {' '.join(chunk.split())}")
        step = next(steps, None) if chunk.endswith("</search>") else None
        if step is not None:
            lines.append(f"  retrieved: {' | '.join(f'{t} ({i})' for t, i in zip(step.passage_titles, step.passage_ids))}")
    if record.invalid_actions:
        lines.append(f"invalid actions: {', '.join(record.invalid_actions)}")
    return lines
