"""``python -m stepsearch``: the training subcommands (LightningCLI) and the tool subcommands.

``fit``/``validate``/``test``/``predict`` go to LightningCLI (``stepsearch.commands.fit``), so every
Lightning flag works (``--trainer.strategy ddp``, ``--trainer.num_nodes 2``, ``--config exp.yaml``).
The other subcommands are plain argparse commands; each lives next to the code it drives as a pair
``configure_<name>(parser)`` / ``run_<name>(args)`` in a module that is cheap to import (heavy
imports happen inside ``run_<name>``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stepsearch.errors import StepSearchError
from stepsearch.commands.argument_errors import (
    OneLineArgumentParser,
    check_config_files,
    parse_args_one_line,
    stepsearch_cause,
)

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# name -> (module, function stem, one-line help) or a nested table for two-word commands.
COMMANDS: dict = {
    "index": {
        "build": ("stepsearch.retrieval.commands", "index_build", "Build a BM25 or dense index from a JSONL corpus."),
    },
    "search": ("stepsearch.retrieval.commands", "search", "Query an index: one query as a table, or a file of queries to JSONL."),
    "serve": ("stepsearch.retrieval.commands", "serve", "Serve an index over HTTP (Search-R1 compatible POST /retrieve)."),
    "data": {
        "build": ("stepsearch.data.commands", "data_build", "Build the StepSearch training set and corpus from MuSiQue/HotpotQA/2Wiki."),
        "synth": ("stepsearch.data.synthetic", "data_synth", "Generate a fictional multi-hop world (corpus + train/val/test)."),
        "convert": ("stepsearch.data.commands", "data_convert", "Convert QA files between formats (ours, StepSearch release, Search-R1 parquet)."),
    },
    "model": {
        "tiny": ("stepsearch.models.tiny", "model_tiny", "Make a tiny Qwen2-architecture model + BPE tokenizer offline."),
        "convert": ("stepsearch.models.pretrained", "model_convert", "Convert a GGUF file into a float32 Hugging Face model folder (tokenizer, chat template)."),
    },
    "sft": ("stepsearch.training.sft", "sft", "Supervised warm-start on golden search trajectories."),
    "evaluate": ("stepsearch.commands.evaluate", "evaluate", "Benchmark table: EM/F1 of agent/rag/direct per benchmark (Markdown, CSV, MLflow, JSONL)."),
    "ask": ("stepsearch.commands.evaluate", "ask", "Ask a policy one question; print its trajectory turn by turn."),
    "compare": ("stepsearch.commands.compare", "compare", "Runs from MLflow grouped by a param/tag: mean ± std table and curves PNG."),
    "ui": ("stepsearch.commands.compare", "ui", "Start `mlflow ui` on the store and print each experiment's runs-table URL."),
}




def _add_command(subparsers, name: str, spec) -> None:
    if isinstance(spec, dict):
        group = subparsers.add_parser(name, help=f"{name} subcommands")
        inner = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        for sub, subspec in spec.items():
            _add_command(inner, sub, subspec)
        return
    module_name, stem, help_text = spec
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    module = importlib.import_module(module_name)
    getattr(module, f"configure_{stem}")(parser)
    parser.set_defaults(_run=getattr(module, f"run_{stem}"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m stepsearch",
        description="StepSearch: train LLM search agents with step-wise PPO. "
        "Training: fit | validate | test | predict (LightningCLI; `fit --help` lists every flag).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        subparsers.add_parser(name, help=f"LightningCLI {name} (see `python -m stepsearch {name} --help`)", add_help=False)
    for name, spec in COMMANDS.items():
        _add_command(subparsers, name, spec)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            check_config_files(argv[1:])  # a typo in the path fails before torch/Lightning are imported
            from stepsearch.commands.fit import run_lightning  # lazy: loads lightning, torch, transformers

            try:
                run_lightning(argv)
            except Exception as err:
                # jsonargparse instantiates the config's dataclasses while parsing and wraps a
                # validation error of ours in its own ValueErrors: report ours, in one line.
                cause = stepsearch_cause(err)
                if cause is None:
                    raise
                raise cause from None
            return

        parser = build_parser()
        args = parse_args_one_line(parser, argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            raise SystemExit(0 if not argv else 2)
        code = args._run(args)
        raise SystemExit(code or 0)
    except StepSearchError as err:
        _print_error(str(err))
        raise SystemExit(getattr(err, "exit_code", 2)) from None  # 130 for Ctrl-C during fit
    except KeyboardInterrupt:
        _print_error("interrupted")
        raise SystemExit(130) from None


def _print_error(message: str) -> None:
    try:
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), message))
    except ImportError:  # pragma: no cover
        print(f"error: {message}", file=sys.stderr)
