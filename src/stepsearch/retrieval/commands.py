"""CLI commands of the retrieval layer: ``index build``, ``search`` and ``serve``.

Cheap to import: pyserini, faiss, torch and FastAPI load inside ``run_*``. Bad input raises
:class:`~stepsearch.errors.StepSearchError` subclasses, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stepsearch.arguments import positive_int
from stepsearch.errors import DataError, StepSearchError
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever, index_kind
from stepsearch.retrieval.server import create_app, run_server

QUERY_FIELDS = ("query", "question")


# ----------------------------------------------------------------------------- index build


def configure_index_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", help="JSONL corpus: {id, contents} (wiki-18) or {id, title, text}")
    parser.add_argument("--index", required=True, help="output index directory (new, empty, or an index to replace)")
    parser.add_argument("--kind", choices=("bm25", "dense"), default="bm25", help="index type (default: bm25)")
    parser.add_argument("--threads", type=positive_int, default=2, help="indexing threads (default: 2)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad corpus line instead of skipping")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    dense = parser.add_argument_group("dense options")
    dense.add_argument("--encoder", default=None, help="encoder name or local path (default: packaged all-MiniLM-L6-v2)")
    dense.add_argument("--query-prefix", default="query: ", help="prefix recorded for queries (default: 'query: ')")
    dense.add_argument("--passage-prefix", default="passage: ", help="prefix for passages (default: 'passage: ')")
    dense.add_argument("--faiss", default="flat",
                       help="FAISS index type: flat, flat-fp16, hnsw, hnsw-sq8, ivf-flat, ivf-sq8, ivf-sq4, ivf-pq, "
                            "or a faiss.index_factory string (default: flat)")
    dense.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: ~4*sqrt(passages))")
    dense.add_argument("--pq-m", type=positive_int, default=None, help="ivf-pq bytes per vector (default: dim/4)")
    dense.add_argument("--train-size", type=positive_int, default=None,
                       help="vectors sampled to train IVF/PQ/SQ types (default: min(all, max(100k, 64*nlist)))")
    dense.add_argument("--rerank", action="store_true",
                       help="also keep fp16 vectors on disk (2*dim bytes a passage) to re-rank candidates exactly")
    dense.add_argument("--batch-size", type=positive_int, default=64, help="encoding batch size (default: 64)")
    dense.add_argument("--max-length", type=positive_int, default=256, help="max tokens per passage (default: 256)")
    dense.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="encoder pooling (default: mean)")
    external = parser.add_argument_group("indexes built elsewhere (attached: nothing copied or re-encoded)")
    external.add_argument("--faiss-file", help="a FAISS index file (e.g. Search-R1's e5_Flat.index); --corpus is "
                                               "its JSONL (row i = vector i), --encoder/--query-prefix its encoder")
    external.add_argument("--lucene-dir", help="a Lucene index folder built by Pyserini/Anserini (stored contents or raw)")


def run_index_build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stepsearch.retrieval.faiss_index import FaissSpec  # lazy: loads numpy
    from stepsearch.retrieval.index import attach_index, build_index, read_index_meta  # lazy: loads numpy

    if args.faiss_file and args.lucene_dir:
        raise StepSearchError("give --faiss-file or --lucene-dir, not both")
    if args.faiss_file or args.lucene_dir:
        if args.lucene_dir and args.corpus:
            raise StepSearchError("--lucene-dir takes no --corpus: the Lucene index stores its documents")
        index_dir = attach_index(
            args.index, faiss_file=args.faiss_file, corpus=args.corpus, lucene_dir=args.lucene_dir,
            encoder=args.encoder, query_prefix=args.query_prefix, pooling=args.pooling,
            max_length=args.max_length, show_progress=not args.quiet,
        )
    else:
        if not args.corpus:
            raise StepSearchError("--corpus is required (or attach an index built elsewhere: --faiss-file / --lucene-dir)")
        index_dir = build_index(
            args.corpus,
            args.index,
            args.kind,
            encoder=args.encoder,
            threads=args.threads,
            strict=args.strict,
            show_progress=not args.quiet,
            query_prefix=args.query_prefix,
            passage_prefix=args.passage_prefix,
            faiss_index=FaissSpec(type=args.faiss, nlist=args.nlist, pq_m=args.pq_m, train_size=args.train_size,
                                  rerank=args.rerank),
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    meta = read_index_meta(index_dir)
    if meta.skipped:
        errors = Console(stderr=True)
        errors.print(f"[yellow]skipped {meta.skipped} bad corpus line(s)[/] (--strict fails instead):", soft_wrap=True)
        for example in meta.skipped_examples:
            errors.print(f"  {example}", markup=False, highlight=False, soft_wrap=True)
        if meta.skipped > len(meta.skipped_examples):
            errors.print(f"  ... and {meta.skipped - len(meta.skipped_examples)} more")
    attached = bool(args.faiss_file or args.lucene_dir)
    table = Table(title=f"{meta.kind} index {'attached' if attached else 'built'}", show_header=False)
    table.add_row("index", str(index_dir))
    if meta.kind == "bm25" and attached:
        table.add_row("Lucene folder", meta.lucene_dir)
    else:
        table.add_row("corpus", str(meta.corpus))
    table.add_row("passages", f"{meta.count:,}")
    if not attached:
        table.add_row("skipped lines", str(meta.skipped))
    if meta.kind == "dense":
        faiss_class = meta.faiss_params.get("faiss_class", "")
        table.add_row("encoder", f"{meta.encoder} ({meta.dim}-d), query prefix {meta.query_prefix!r}")
        table.add_row("FAISS", f"{meta.faiss_file or 'faiss.index'} ({meta.faiss_index}, {faiss_class})")
    if meta.build_seconds is not None:
        table.add_row("seconds", f"{meta.build_seconds:.1f}")
    Console().print(table)
    return 0


# ----------------------------------------------------------------------------- search


def configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", help="one query (prints a table); or use --queries FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", help="index directory (bm25 or dense, detected)")
    source.add_argument("--url", help="search a running service instead (http://HOST:PORT)")
    parser.add_argument("--queries", help="file of queries: JSONL with a 'query' field, or one query per line")
    parser.add_argument("--output", help="JSONL output for --queries (default: stdout)")
    parser.add_argument("-k", "--k", type=positive_int, default=3, help="passages per query (default: 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="search threads (default: 2)")
    parser.add_argument("--batch-size", type=positive_int, default=1000, help="queries per batch call (default: 1000)")
    parser.add_argument("--bm25-k1", type=float, default=0.9, help="BM25 k1 (default: 0.9)")
    parser.add_argument("--bm25-b", type=float, default=0.4, help="BM25 b (default: 0.4)")
    add_dense_open_options(parser)


def add_dense_open_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``search``/``serve`` for opening a dense index (ours, attached, or a bare FAISS file)."""
    dense = parser.add_argument_group("dense options")
    dense.add_argument("--encoder", default=None, help="override the index's encoder (name or local path)")
    dense.add_argument("--corpus-jsonl", dest="docstore", default=None,
                       help="with --index FILE.index: the corpus JSONL of that FAISS file (row i = vector i)")
    dense.add_argument("--query-prefix", default=None, help="override the index's query prefix")
    dense.add_argument("--pooling", choices=("mean", "cls"), default=None, help="override the encoder pooling")
    dense.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists visited per query (default: 32)")
    dense.add_argument("--ef-search", type=positive_int, default=None, help="HNSW candidates per query (default: 128)")
    dense.add_argument("--rerank-candidates", type=int, default=None,
                       help="rows re-ranked exactly per query, for an index built with --rerank (default 100, 0 = off)")
    dense.add_argument("--mmap", action="store_true", help="memory-map the FAISS codes instead of loading them")
    dense.add_argument("--faiss-gpu", action="store_true", help="FAISS on all visible GPUs (sharded, fp16)")


def dense_config_fields(args: argparse.Namespace) -> dict:
    """RetrieverConfig fields from :func:`add_dense_open_options`."""
    return {"encoder": args.encoder, "query_prefix": args.query_prefix, "pooling": args.pooling,
            "nprobe": args.nprobe, "ef_search": args.ef_search, "mmap": args.mmap, "faiss_gpu": args.faiss_gpu,
            "rerank_candidates": args.rerank_candidates}


def read_queries(path: str | Path) -> list[str]:
    """Queries from JSONL (``query`` or ``question`` field) or plain lines; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"queries file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(f"queries file is empty: {path}")
    if not numbered[0][1].startswith("{"):
        return [line for _, line in numbered]
    queries = []
    for line_no, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None
        query = next((record[f] for f in QUERY_FIELDS if isinstance(record, dict) and f in record), None)
        if not isinstance(query, str) or not query.strip():
            raise DataError(f'{path}:{line_no}: needs a non-empty string field "query"')
        queries.append(query)
    return queries


def _open_retriever(args: argparse.Namespace):
    if args.url:
        return build_retriever(RetrieverConfig(kind="http", url=args.url))
    return build_retriever(
        RetrieverConfig(
            kind=index_kind(args.index), index=args.index, corpus=args.docstore, threads=args.threads,
            bm25_k1=args.bm25_k1, bm25_b=args.bm25_b, **dense_config_fields(args),
        )
    )


def run_search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.queries is None):
        raise StepSearchError("give either one query (positional) or --queries FILE, not both/neither")
    if args.query is not None and not args.query.strip():
        raise StepSearchError("the query is empty: give a non-empty search string")
    if args.output and not args.queries:
        raise StepSearchError("--output needs --queries FILE")
    queries = [args.query] if args.query is not None else read_queries(args.queries)
    retriever = _open_retriever(args)
    if args.query is not None:
        _print_hits(args.query, retriever.search([args.query], args.k)[0])
        return 0
    _search_to_jsonl(retriever, queries, args.k, args.batch_size, args.output)
    return 0


def _print_hits(query: str, hits) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"top {len(hits)} for: {query}", show_lines=True)
    table.add_column("#", style="bold")
    table.add_column("score", style="cyan")
    table.add_column("id", style="magenta", no_wrap=True)
    table.add_column("title", style="green", overflow="fold", ratio=1)
    table.add_column("text", overflow="fold", ratio=3)
    for rank, hit in enumerate(hits, start=1):
        text = hit.text if len(hit.text) <= 200 else hit.text[:197] + "..."
        table.add_row(str(rank), f"{hit.score:.3f}", hit.id, hit.title, text)
    Console().print(table if hits else f"no passage matches: {query}")


def _search_to_jsonl(retriever, queries: list[str], k: int, batch_size: int, output: str | None) -> None:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    handle = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    started = time.perf_counter()
    try:
        with Progress(console=console, disable=output is None, transient=True) as progress:
            task = progress.add_task("searching", total=len(queries))
            for start in range(0, len(queries), batch_size):
                batch = queries[start : start + batch_size]
                try:
                    results = retriever.search(batch, k)
                except StepSearchError as err:
                    raise type(err)(f"{err} (query {start + 1} onwards in the file)") from None
                for query, hits in zip(batch, results):
                    record = {"query": query, "hits": [{"id": h.id, "title": h.title, "score": h.score} for h in hits]}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                progress.advance(task, len(batch))
    finally:
        if output:
            handle.close()
    seconds = time.perf_counter() - started
    if output:
        rate = len(queries) / max(seconds, 1e-9)
        console.print(f"wrote {len(queries)} results to {output} ({rate:.0f} queries/s)", soft_wrap=True, highlight=False)


# ----------------------------------------------------------------------------- serve


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory (bm25 or dense, detected)")
    parser.add_argument("--corpus", default=None, help="build a bm25 index from this JSONL first if --index is missing")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--threads", type=positive_int, default=2, help="search threads (default: 2)")
    parser.add_argument("--cache-size", type=int, default=0, help="LRU cache entries (default: 0 = off)")
    parser.add_argument("--topk", type=positive_int, default=3, help="default topk when a request has none")
    parser.add_argument("--max-batch", type=positive_int, default=8192,
                        help="max queries per request; more get 413 (default: 8192, every released recipe fits)")
    parser.add_argument("--max-query-chars", type=positive_int, default=4096, help="max characters per query")
    parser.add_argument("--max-topk", type=positive_int, default=100, help="max topk per request")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="requests waiting for the search worker; more get 503 + Retry-After (default: 256)")
    parser.add_argument("--max-batch-queries", type=positive_int, default=1024,
                        help="queries of several requests merged into one search call (default: 1024)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="wait this long for more requests before a search call (default: 0)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a request may wait and search; then 504 (default: 30)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_dense_open_options(parser)


def run_serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    if not 0 <= args.port <= 65535:
        raise StepSearchError(f"--port must be between 0 and 65535, got {args.port}")
    # Checked before the (slow) index open: a typo must not cost a minute of loading.
    if args.request_timeout <= 0:
        raise StepSearchError(f"--request-timeout must be > 0 seconds, got {args.request_timeout:g}")
    if args.batch_wait_ms < 0:
        raise StepSearchError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms:g}")
    if args.corpus and args.docstore:
        raise StepSearchError("--corpus builds a BM25 index; --corpus-jsonl is a FAISS file's corpus: give one")
    kind = "bm25"
    if not args.corpus or Path(args.index).exists():
        kind = index_kind(args.index)
    config = RetrieverConfig(
        kind=kind, index=args.index, corpus=args.corpus or args.docstore,
        threads=args.threads, cache_size=max(args.cache_size, 0), **dense_config_fields(args),
    )
    retriever = build_retriever(config)
    try:  # the retriever (a JVM searcher, a memory-mapped index) is closed however serving ends
        app = create_app(
            retriever, max_batch=args.max_batch, max_query_chars=args.max_query_chars,
            max_topk=args.max_topk, default_topk=args.topk, max_queue=args.max_queue,
            max_batch_queries=args.max_batch_queries, batch_wait_ms=args.batch_wait_ms,
            request_timeout_s=args.request_timeout,
        )
        console = Console(stderr=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]warning:[/] binding {args.host}: the service has no authentication", soft_wrap=True)
        console.print(f"serving {kind} index {args.index} at http://{args.host}:{args.port}/retrieve (Ctrl-C stops)",
                      soft_wrap=True, highlight=False)
        run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        close = getattr(retriever, "close", None)
        if callable(close):
            close()
    console.print("retrieval service stopped", highlight=False)
    return 0
