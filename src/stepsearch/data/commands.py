"""``python -m stepsearch data build`` and ``data convert``: argparse wiring, progress and tables.

Cheap to import: the data modules, rich and the retriever are imported inside ``run_*``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stepsearch.arguments import positive_int
from stepsearch.data.corpus import write_corpus
from stepsearch.data.pipeline import build_training_set, filter_search_keys
from stepsearch.data.sources import read_examples, write_examples
from stepsearch.retrieval.factory import load_retriever

OUTPUT_FORMATS = ("stepsearch", "stepsearch_release", "searchr1_parquet")
INPUT_FORMATS = ("stepsearch", "hotpotqa", "musique", "2wiki", "flashrag", "stepsearch_release", "searchr1_parquet")


def configure_data_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=("musique", "hotpotqa", "2wiki"), help="layout of the input file (official release format)")
    parser.add_argument("--input", required=True, help="input file (JSON/JSONL/Parquet, a glob, or a hub dataset name)")
    parser.add_argument("--corpus", required=True, help="output corpus JSONL (wiki-18 layout: id, contents)")
    parser.add_argument("--out", required=True, help="output training set")
    parser.add_argument("--format", default="stepsearch", choices=OUTPUT_FORMATS, help="output format (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--filter", action="store_true", help="build a BM25 index over the written corpus and keep only keys that retrieve their golden passage")
    group.add_argument("--filter-index", metavar="DIR", help="filter keys with this existing index (BM25 or dense) instead")
    parser.add_argument("--filter-k", type=positive_int, default=3, help="a key is kept if a golden passage is in its top-k (default: %(default)s)")
    parser.add_argument("--split", default=None, help="split to read when --input is a hub dataset")
    parser.add_argument("--strict", action="store_true", help="fail at the first bad row instead of skipping it")
    parser.add_argument("--limit", type=positive_int, default=None, help="stop after this many examples")


def configure_data_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="input file (or hub dataset name)")
    parser.add_argument("--output", required=True, help="output file")
    parser.add_argument("--from", dest="from_format", default=None, choices=INPUT_FORMATS, help="input format (default: detected from the rows)")
    parser.add_argument("--to", dest="to_format", default=None, choices=OUTPUT_FORMATS, help="output format (default: searchr1_parquet for .parquet, else stepsearch)")
    parser.add_argument("--split", default=None, help="split to read from a hub dataset; also written as extra_info.split (default: train)")
    parser.add_argument("--dataset", default=None, help="dataset name to record on every example (default: inferred)")
    parser.add_argument("--template", default="think", help="prompt template for Search-R1 parquet rows (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="fail at the first bad row instead of skipping it")
    parser.add_argument("--limit", type=positive_int, default=None, help="stop after this many examples")


def _skips_table(skipped, limit: int = 10):
    from rich.table import Table

    table = Table(title=f"skipped rows (first {min(limit, len(skipped))} of {len(skipped)})", show_lines=False)
    table.add_column("where")
    table.add_column("reason")
    for skip in skipped[:limit]:
        table.add_row(skip.where, skip.reason)
    return table


def _filter_retriever(args, corpus: Path, console):
    """The retriever that filters keys: --filter-index as it is, or a fresh BM25 index of the corpus
    next to it (``<corpus stem>_bm25``, replaced on every build since the corpus was rewritten)."""
    if args.filter_index:
        return load_retriever(args.filter_index)
    from stepsearch.retrieval.index import build_index  # lazy: loads numpy

    index_dir = corpus.with_name(corpus.stem + "_bm25")
    console.print(f"building BM25 index {index_dir}")
    build_index(corpus, index_dir, "bm25")
    return load_retriever(index_dir)


def run_data_build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"reading {args.input}", total=None)
        result = build_training_set(args.source, args.input, strict=args.strict, limit=args.limit)
        progress.update(task, total=1, completed=1)
    corpus = Path(args.corpus)
    result.summary.corpus_passages = write_corpus(result.passages, corpus)
    console.print(f"wrote corpus {corpus} ({result.summary.corpus_passages} passages)")

    if args.filter or args.filter_index:
        retriever = _filter_retriever(args, corpus, console)
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"filtering keys (top-{args.filter_k})", total=None)
            stats = filter_search_keys(
                result.examples, retriever, k=args.filter_k, progress=lambda done, total: progress.update(task, completed=done, total=total)
            )
        s = result.summary
        s.filtered, s.filter_k = True, args.filter_k
        s.keys_checked, s.keys_kept, s.keys_unfilterable = stats.checked, stats.kept, stats.unfilterable
        s.sub_questions_without_keys = sum(1 for ex in result.examples for sq in ex.sub_questions if not sq.search_keys)
    write_examples(result.examples, args.out, format=args.format)
    console.print(f"wrote {len(result.examples)} examples to {args.out} ({args.format})")

    table = Table(title="data build summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in result.summary.table_rows():
        table.add_row(name, value)
    Console().print(table)
    if result.summary.filtered:
        s = result.summary
        Console().print(f"kept-keys ratio: {s.kept_ratio:.3f} ({s.keys_kept}/{s.keys_checked})")
        if s.keys_checked and not s.keys_kept:
            console.print("[yellow]warning:[/] no key retrieved its golden passage: is the filter index built over this corpus?")
    if result.skipped:
        console.print(_skips_table(result.skipped))
    return 0


def run_data_convert(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    to_format = args.to_format or ("searchr1_parquet" if str(args.output).endswith(".parquet") else "stepsearch")
    with console.status(f"reading {args.input}"):
        result = read_examples(args.input, format=args.from_format, split=args.split, strict=args.strict, dataset=args.dataset, limit=args.limit)
    write_examples(result.examples, args.output, format=to_format, split=args.split or "train", template=args.template)
    table = Table(title="data convert")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("input", f"{args.input} ({result.format})")
    table.add_row("output", f"{args.output} ({to_format})")
    table.add_row("rows read", str(result.rows))
    table.add_row("examples written", str(len(result.examples)))
    table.add_row("rows skipped", str(len(result.skipped)))
    for kind, n in result.skip_counts().most_common():
        table.add_row(f"  skipped: {kind}", str(n))
    Console().print(table)
    if result.skipped:
        console.print(_skips_table(result.skipped))
    return 0
