"""Retrieval benchmark on the shared corpus: speed and recall of golden paragraphs.

Compares Pyserini BM25 (Lucene, 1 and 2 threads) with ``bm25s`` (pure Python/numpy BM25, same
k1/b, English stopwords and Snowball stemming when PyStemmer is installed) and, unless
``--skip-dense``, our dense retriever (packaged MiniLM, FAISS flat). Reports per backend:

* build: seconds to index the corpus (Pyserini: the JVM is already running; its start is shown apart)
* latency: one query per call, median and p95 over ``--latency-queries`` queries, k=10
* throughput: all queries (MuSiQue sub-questions + HotpotQA questions, ``--repeat`` times) in one
  batch call, k=10; best of 3 runs
* recall@3 / recall@10 of golden paragraphs for MuSiQue sub-questions and HotpotQA questions

Run by hand: ``.venv/bin/python benchmarks/retrieval.py [--markdown docs/retrieval_benchmark.md]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stepsearch.retrieval.base import Passage  # noqa: E402
from stepsearch.retrieval.corpus import read_corpus  # noqa: E402
from stepsearch.retrieval.recall import (  # noqa: E402
    PassageLookup,
    hotpot_question_queries,
    load_raw_rows,
    musique_subquestion_queries,
    recall_at_k,
)

SHARED = Path(os.environ.get("STEPSEARCH_SHARED", REPO.parent / "shared")) / "data"
K = 10
BATCH_RUNS = 3


@dataclass
class Row:
    """One line of the result table."""

    name: str
    build_s: float
    latency_ms: list[float] = field(default_factory=list)
    throughput_qps: float = 0.0
    recall: dict[str, dict[int, float]] = field(default_factory=dict)


class Bm25sRetriever:
    """bm25s behind our Retriever protocol (for recall and timing with the same harness)."""

    def __init__(self, passages: list[Passage], threads: int, k1: float = 0.9, b: float = 0.4) -> None:
        import bm25s

        try:
            import Stemmer

            self.stemmer = Stemmer.Stemmer("english")
        except ImportError:
            self.stemmer = None
        self.bm25s, self.passages, self.threads = bm25s, passages, threads
        tokens = bm25s.tokenize([p.contents for p in passages], stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.model = bm25s.BM25(k1=k1, b=b, method="lucene")
        self.model.index(tokens, show_progress=False)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        tokens = self.bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)
        rows, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=self.threads)
        return [
            [Passage(self.passages[i].id, self.passages[i].title, self.passages[i].text, float(s)) for i, s in zip(r, sc)]
            for r, sc in zip(rows, scores)
        ]


def measure(name, make, queries, recall_sets, latency_queries) -> Row:
    started = time.perf_counter()
    retriever = make()
    row = Row(name, time.perf_counter() - started)
    retriever.search([queries[0]], K)  # warm-up (JIT, caches)
    for query in queries[:latency_queries]:
        t0 = time.perf_counter()
        retriever.search([query], K)
        row.latency_ms.append((time.perf_counter() - t0) * 1000)
    best = float("inf")
    for _ in range(BATCH_RUNS):  # best of a few: the machine is shared, noise only adds time
        t0 = time.perf_counter()
        retriever.search(queries, K)
        best = min(best, time.perf_counter() - t0)
    row.throughput_qps = len(queries) / best
    for label, recall_queries in recall_sets.items():
        row.recall[label] = recall_at_k(retriever, recall_queries, ks=(3, 10))
    return row


def _fmt_rows(rows: list[Row], labels: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["retriever", "build s", "p50 ms", "p95 ms", "batch q/s"]
    header += [f"{label} R@{k}" for label in labels for k in (3, 10)]
    body = []
    for row in rows:
        lat = sorted(row.latency_ms)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        cells = [row.name, f"{row.build_s:.1f}", f"{statistics.median(lat):.2f}", f"{p95:.2f}", f"{row.throughput_qps:,.0f}"]
        cells += [f"{row.recall[label][k]:.3f}" for label in labels for k in (3, 10)]
        body.append(cells)
    return header, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus" / "multihop_passages.jsonl")
    parser.add_argument("--raw-dir", type=Path, default=SHARED / "raw")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the query set in the throughput batch")
    parser.add_argument("--skip-dense", action="store_true", help="skip the dense row (encoding takes minutes on CPU)")
    parser.add_argument("--dense-index", type=Path, help="reuse this dense index (its recorded build time is shown)")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 132))
    corpus = read_corpus(args.corpus)
    lookup = PassageLookup(corpus.passages)
    recall_sets = {
        "MQ": musique_subquestion_queries(load_raw_rows(args.raw_dir / "musique_ans_dev_sample.jsonl"), lookup),
        "HP": hotpot_question_queries(load_raw_rows(args.raw_dir / "hotpot_dev_distractor_sample.json"), lookup),
    }
    base_queries = [q.query for qs in recall_sets.values() for q in qs]
    queries = base_queries * args.repeat

    from stepsearch.retrieval._lucene import lucene
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    t0 = time.perf_counter()
    lucene()
    jvm_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="stepsearch-bench-"))
    # Warm the JVM's JIT once (index + searches), so neither thread setting pays for it.
    warm = BM25Retriever(build_index(args.corpus, work / "warm-up", "bm25", show_progress=False))
    for query in base_queries:
        warm.search([query], K)
    warm.search(queries, K)
    warm.close()
    rows = []
    for threads in (1, 2):
        def make(threads=threads):
            index = build_index(args.corpus, work / f"bm25-t{threads}", "bm25", threads=threads, show_progress=False)
            return BM25Retriever(index, threads=threads)

        rows.append(measure(f"Pyserini BM25 ({threads} thr)", make, queries, recall_sets, args.latency_queries))
        console.print(f"done: {rows[-1].name}")
    for threads in (1, 2):
        rows.append(measure(f"bm25s ({threads} thr)", lambda t=threads: Bm25sRetriever(corpus.passages, t),
                            queries, recall_sets, args.latency_queries))
        console.print(f"done: {rows[-1].name}")
    if not args.skip_dense:
        from stepsearch.retrieval.dense import DenseRetriever

        def make_dense():
            index = args.dense_index or build_index(args.corpus, work / "dense", "dense", threads=2, show_progress=True)
            return DenseRetriever(index, threads=2)

        rows.append(measure("dense MiniLM flat (2 thr)", make_dense, queries, recall_sets,
                            args.latency_queries))
        if args.dense_index:
            from stepsearch.retrieval.index import read_index_meta

            rows[-1].build_s = read_index_meta(args.dense_index).build_seconds

    for path in work.iterdir():
        if path.name != "dense":
            shutil.rmtree(path, ignore_errors=True)
    if (work / "dense").exists():
        console.print(f"dense index kept at {work / 'dense'} (reuse it with --dense-index)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    labels = list(recall_sets)
    header, body = _fmt_rows(rows, labels)
    stemmer = "PyStemmer" if _has_stemmer() else "no stemmer"
    caption = (
        f"{len(corpus.passages):,} passages; {len(base_queries)} queries: MQ = {len(recall_sets['MQ'])} MuSiQue "
        f"sub-questions, HP = {len(recall_sets['HP'])} HotpotQA questions; p50/p95 = one query per call; batch = "
        f"{len(queries)} queries in one call; k={K}; JVM start {jvm_s:.1f} s (once per process, not in build); "
        f"bm25s: {stemmer}; "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )
    table = Table(title="Retrieval benchmark (shared corpus)", caption=caption)
    for column in header:
        table.add_column(column, justify="left" if column == "retriever" else "right")
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    if args.markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        args.markdown.write_text("\n".join(lines) + f"\n\n{caption}\n", encoding="utf-8")
        console.print(f"markdown table written to {args.markdown}")


def _has_stemmer() -> bool:
    try:
        import Stemmer  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
