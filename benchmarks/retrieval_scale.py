"""Retrieval at corpus scale: BM25, FAISS types and the service at 100k / 300k / 1M passages.

The corpus is generated (wiki-18 is 14 GB and not here), deterministically from ``--seed``, with
the word, length and title statistics of the shared corpus, the 7,416 real passages mixed in so
that recall@10 of the golden paragraphs of the 491 real queries (341 MuSiQue sub-questions, 150
HotpotQA questions) is measured against up to 1M distractors (``retrieval_synth.py`` says how).
FAISS runs on vectors, not encoded text (MiniLM encodes ~20 passages/s on this CPU): synthetic
384-d vectors clustered like the real MiniLM vectors of the shared corpus, with the real ones mixed
in; the real query vectors search, and recall@10 is against flat (exact) search.

Everything runs on one thread (Lucene indexing and batch search, FAISS OpenMP) so that the numbers
are per core; results go to ``--out`` (JSON after every step, so a capped run keeps what it did),
``docs/retrieval_scale.md`` and ``docs/retrieval_scale.png``. Figures at 21,015,324 passages
(wiki-18) are log-log extrapolations from the measured sizes, marked as such.

Run by hand: ``nice -n 10 .venv/bin/python benchmarks/retrieval_scale.py [--sizes 100000 300000 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from retrieval_synth import CorpusModel, clustered_vectors, real_positions, write_generated_corpus  # noqa: E402
from retrieval_vectors import SHARED, load_or_encode  # noqa: E402

WIKI18 = 21_015_324
K = 10
RERANK = 100  # candidates re-ranked exactly in the "+ rerank" variants


# ----------------------------------------------------------------------------- measurements


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def golden_recall(hit_ids: list[list[str]], golden: list[frozenset]) -> float:
    return statistics.fmean(len(g.intersection(ids[:K])) / len(g) for ids, g in zip(hit_ids, golden))


def bench_bm25(corpus: Path, work: Path, queries: list[str], golden) -> dict:
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    started = time.perf_counter()
    index = build_index(corpus, work / "bm25", "bm25", threads=1, show_progress=False)
    build_s = time.perf_counter() - started
    size = sum(f.stat().st_size for f in (index / "lucene").rglob("*") if f.is_file())
    retriever = BM25Retriever(index, threads=1)
    batch = (queries * 2)[:512]
    retriever.search(batch, K)  # warm-up: JIT, page cache
    best = min(_timed(lambda: retriever.search(batch, K)) for _ in range(2))
    latencies = [_timed(lambda q=q: retriever.search([q], K)) * 1000 for q in queries[:200]]
    recall = golden_recall([[h.id for h in hits] for hits in retriever.search(queries, K)], golden)
    top = [[h.id for h in hits] for hits in retriever.search(batch, K)]
    retriever.close()
    return {"build_s": build_s, "index_bytes": size, "batch512_qps": 512 / best, "p50_ms": percentile(latencies, 0.5),
            "p95_ms": percentile(latencies, 0.95), "golden_recall10": recall, "top_ids": top}


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def bench_bm25s(corpus: Path, queries: list[str], pyserini_top: list[list[str]]) -> dict:
    import bm25s
    import psutil
    import Stemmer

    from stepsearch.retrieval.corpus import iter_corpus

    stemmer = Stemmer.Stemmer("english")
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    passages = list(iter_corpus(corpus))
    ids = [p.id for p in passages]
    tokens = bm25s.tokenize([p.contents for p in passages], stopwords="en", stemmer=stemmer, show_progress=False)
    del passages
    model = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    model.index(tokens, show_progress=False)
    build_s = time.perf_counter() - started
    memory = psutil.Process().memory_info().rss - rss
    batch = (queries * 2)[:512]

    def search(texts):
        query_tokens = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
        return model.retrieve(query_tokens, k=K, show_progress=False, n_threads=1)[0]

    search(batch)
    best = min(_timed(lambda: search(batch)) for _ in range(2))
    rows = search(batch)
    overlap = statistics.fmean(len(set(ids[r] for r in row) & set(top)) / K for row, top in zip(rows, pyserini_top))
    return {"build_s": build_s, "memory_bytes": memory, "batch512_qps": 512 / best, "top10_overlap_pyserini": overlap}


FAISS_BENCH = {  # type -> FaissSpec overrides used at every size
    "flat": {}, "hnsw": {"ef_construction": 100}, "ivf-sq8": {}, "ivf-pq": {},
}


def bench_faiss(vectors: np.ndarray, query_vectors: np.ndarray, golden, ids_of_rows, kinds, pq_m: int) -> dict:
    import faiss

    from stepsearch.retrieval.dense import build_faiss_from_vectors
    from stepsearch.retrieval.faiss_index import FaissSpec, default_nlist, index_bytes, set_search_params

    faiss.omp_set_num_threads(1)
    results, flat_top = {}, None
    nlist = min(default_nlist(len(vectors)), 1024)  # k-means cost on one core; 4·sqrt(1M) would be 4000
    for kind in kinds:
        spec = FaissSpec(type=kind, nlist=nlist if kind.startswith("ivf") else None, train_size=50_000,
                         pq_m=pq_m if kind == "ivf-pq" else None, **FAISS_BENCH.get(kind, {}))
        started = time.perf_counter()
        index = build_faiss_from_vectors(vectors, spec, threads=1)
        build_s = time.perf_counter() - started
        set_search_params(index, nprobe=32, ef_search=128)
        search_s = _timed(lambda: index.search(query_vectors, K))
        rows = index.search(query_vectors, K)[1]
        if kind == "flat":
            flat_top = rows
        memory = vectors.shape[0] * vectors.shape[1] * 4 if kind == "flat" else index_bytes(index)
        results[kind] = {
            "build_s": build_s, "memory_bytes": memory, "qps": len(query_vectors) / search_s,
            "recall10_vs_flat": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, flat_top)])),
            "golden_recall10": golden_recall([[ids_of_rows(r) for r in row] for row in rows], golden),
            "params": {k: v for k, v in spec.params().items() if k != "seed"},
        }
        del index
    return results


def bench_server(index_dir: Path, queries: list[str], clients_list=(1, 8, 32), per_request: int = 4) -> dict:
    """Start ``serve`` in its own process; threads post requests of ``per_request`` queries, k=3."""
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    server = subprocess.Popen([sys.executable, "-m", "stepsearch", "serve", "--index", str(index_dir), "--port",
                               str(port), "--threads", "1", "--log-level", "warning"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start: {server.stderr.read()[-500:]}") from None
                time.sleep(0.5)
        out = {}
        for clients in clients_list:
            before = httpx.get(f"{url}/health").json()
            requests_each = max(4, 160 // clients)
            latencies, failures, lock = [], 0, threading.Lock()

            def run(client_no):
                nonlocal failures
                with httpx.Client(timeout=120) as client:
                    for n in range(requests_each):
                        start = (client_no * requests_each + n) * per_request % (len(queries) - per_request)
                        body = {"queries": queries[start : start + per_request], "topk": 3}
                        t0 = time.perf_counter()
                        ok = client.post(f"{url}/retrieve", json=body).status_code == 200
                        with lock:
                            latencies.append((time.perf_counter() - t0) * 1000)
                            failures += not ok

            threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            after = httpx.get(f"{url}/health").json()
            calls = after["batching"]["search_calls"] - before["batching"]["search_calls"]
            out[str(clients)] = {"requests_per_s": len(latencies) / elapsed,
                                 "queries_per_s": len(latencies) * per_request / elapsed,
                                 "p50_ms": percentile(latencies, 0.5), "p95_ms": percentile(latencies, 0.95),
                                 "failed": failures,
                                 "requests_per_search_call": (after["requests"] - before["requests"]) / max(calls, 1)}
        return out
    finally:
        server.terminate()
        server.wait(60)


def bench_compressed_real(vectors: np.ndarray, query_vectors: np.ndarray, golden, ids) -> list[dict]:
    """The acceptance sweep: types and parameters on the real MiniLM vectors of the shared corpus."""
    import faiss

    from stepsearch.retrieval.dense import build_faiss_from_vectors
    from stepsearch.retrieval.faiss_index import FaissSpec, index_bytes, rerank, set_search_params

    faiss.omp_set_num_threads(1)
    flat_bytes = vectors.shape[0] * vectors.shape[1] * 4
    truth = build_faiss_from_vectors(vectors, "flat").search(query_vectors, K)[1]
    flat_golden = golden_recall([[ids[r] for r in row] for row in truth], golden)
    # A second query set: 500 passages as queries (their own row excluded from the comparison).
    rows = np.random.default_rng(0).choice(len(vectors), 500, replace=False)
    truth_p = build_faiss_from_vectors(vectors, "flat").search(vectors[rows], K + 1)[1]
    variants = [("flat-fp16", {}), ("hnsw-sq8", {}), ("ivf-sq8", {}), ("ivf-sq4", {}), ("RaBitQ3", {})]
    variants += [("ivf-pq", {"pq_m": m}) for m in (48, 96, 128)]
    variants += [("ivf-pq", {"pq_m": m, "rerank": True}) for m in (32, 48)]
    stored = vectors.astype(np.float16)  # what rerank.f16.npy holds
    out = []
    for kind, extra in variants:
        nlist = 64
        spec = FaissSpec(type=kind.format(nlist=nlist), nlist=nlist if kind.startswith("ivf") else None, **extra)
        try:
            index = build_faiss_from_vectors(vectors, spec, threads=1)
        except Exception as err:  # noqa: BLE001 - a variant FAISS cannot make is reported, not fatal
            out.append({"type": spec.type, "error": str(err)[:120]})
            continue
        if "RaBitQ" in spec.type:
            faiss.downcast_index(index).qb = 8  # 8-bit queries (the default 0 is far less exact)
        for nprobe in ((16, 64) if "IVF" in spec.type.upper() else (None,)):
            set_search_params(index, nprobe=nprobe, ef_search=128)
            if spec.rerank:
                found = rerank(query_vectors, index.search(query_vectors, RERANK)[1], stored, K)[1]
                found_p = rerank(vectors[rows], index.search(vectors[rows], RERANK)[1], stored, K + 1)[1]
            else:
                found = index.search(query_vectors, K)[1]
                found_p = index.search(vectors[rows], K + 1)[1]
            recall_p = np.mean([len(_without(a, r) & _without(b, r)) / K for a, b, r in zip(found_p, truth_p, rows)])
            out.append({"type": spec.type, "params": {k: v for k, v in spec.params().items() if k != "seed"},
                        "nprobe": nprobe, "bytes": index_bytes(index), "memory_vs_flat": index_bytes(index) / flat_bytes,
                        "rerank_candidates": RERANK if spec.rerank else None,
                        "disk_fp16_vs_flat": 0.5 if spec.rerank else 0.0,
                        "recall10_vs_flat": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])),
                        "recall10_vs_flat_passage_queries": float(recall_p),
                        "golden_recall10": golden_recall([[ids[r] for r in row] for row in found], golden),
                        "flat_golden_recall10": flat_golden})
    return out


def _without(found, row) -> set:
    """The first K neighbours other than the query passage itself."""
    return set([int(x) for x in found if x != row][:K])


# ----------------------------------------------------------------------------- extrapolation and report


# How each figure grows with the corpus (n), for extrapolating to wiki-18. Measured points on a
# shared 2-core machine are too noisy (load average 8-15 from other jobs) for a fitted slope, so
# each figure is scaled from the largest measured size by the growth its algorithm implies:
# builds, index and memory grow as n; BM25 and flat search scan work proportional to n (postings
# lengths, vectors), so latency grows and throughput falls as n (an upper bound for BM25: Lucene's
# dynamic pruning skips part of long postings); IVF with nlist ~ sqrt(n) and a fixed nprobe scans
# n/nlist ~ sqrt(n) codes a query; HNSW visits ~log n nodes.
GROWTH = {"build_s": 1.0, "index_bytes": 1.0, "memory_bytes": 1.0, "p50_ms": 1.0, "p95_ms": 1.0,
          "batch512_qps": -1.0, "queries_per_s": -1.0, "requests_per_s": -1.0}
QPS_GROWTH = {"flat": -1.0, "ivf-sq8": -0.5, "ivf-pq": -0.5, "hnsw": "log"}


def extrapolate(sizes: list[int], values: list[float], growth: float | str = 1.0, target: int = WIKI18) -> float | None:
    """The value at the largest measured size, scaled to ``target`` by ``(target/n)**growth`` (or log)."""
    points = [(n, v) for n, v in zip(sizes, values) if v is not None and v > 0]
    if not points:
        return None
    n, value = points[-1]
    if growth == "log":
        return float(value * np.log(n) / np.log(target))
    return float(value * (target / n) ** growth)


def _series(results: dict, path: tuple) -> tuple[list[int], list[float | None]]:
    sizes, values = [], []
    for size, entry in sorted(results["sizes"].items(), key=lambda item: int(item[0])):
        value = entry
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        sizes.append(int(size))
        values.append(value)
    return sizes, values


def _fmt(value, digits=1, scale=1.0) -> str:
    if value is None:
        return "–"
    value = value / scale
    return f"{value:,.{digits}f}"


def render_markdown(results: dict) -> str:
    lines = ["# Retrieval at corpus scale", "",
             f"`benchmarks/retrieval_scale.py`, {results['meta']['host']}; one thread per engine (Lucene "
             "indexing and batch search, FAISS). Corpus generation, vectors and method: see the "
             "benchmark's docstring and `retrieval_synth.py`. Rows marked *extrapolated* scale the largest measured "
             "size to 21,015,324 passages (wiki-18) by the growth each algorithm implies (builds, sizes, BM25 and flat "
             "search cost ∝ n; IVF search ∝ √n with nlist ∝ √n; HNSW ∝ log n): estimates, not measurements. "
             "The machine was shared (load average 8-15 during the run): timings between sizes are noisy, "
             "sizes and recall are not.", ""]
    measured = sorted(int(s) for s in results["sizes"])
    lines += ["## BM25 (Pyserini / Lucene, 1 thread)", "",
              "| passages | build s | index GB | batch-512 q/s | p50 ms | p95 ms | golden R@10 |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    keys = [("build_s", 1, 1), ("index_bytes", 2, 1e9), ("batch512_qps", 0, 1), ("p50_ms", 2, 1), ("p95_ms", 2, 1),
            ("golden_recall10", 3, 1)]
    for size in measured:
        bm25 = results["sizes"][str(size)].get("bm25")
        if bm25:
            lines.append(f"| {size:,} | " + " | ".join(_fmt(bm25.get(k), d, sc) for k, d, sc in keys) + " |")
    extra = [extrapolate(*_series(results, ("bm25", k)), GROWTH[k]) for k, _d, _sc in keys[:5]]
    lines.append(f"| 21,015,324 *extrapolated* | " + " | ".join(_fmt(v, d, sc) for v, (_k, d, sc) in zip(extra, keys))
                 + " | – |")
    lines += ["", "## FAISS (384-d MiniLM-like vectors, 1 thread, nprobe 32, efSearch 128)", "",
              "| passages | type | build s | memory MB | bytes/vector | q/s | recall@10 vs flat | golden R@10 |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    kinds = sorted({k for s in results["sizes"].values() for k in s.get("faiss", {})}, key=list(FAISS_BENCH).index)
    for size in measured:
        for kind, row in results["sizes"][str(size)].get("faiss", {}).items():
            lines.append(f"| {size:,} | {kind} | {_fmt(row['build_s'])} | {_fmt(row['memory_bytes'], 1, 1e6)} | "
                         f"{_fmt(row['memory_bytes'] / size, 0)} | {_fmt(row['qps'], 0)} | "
                         f"{row['recall10_vs_flat']:.3f} | {row['golden_recall10']:.3f} |")
    for kind in kinds:
        build = extrapolate(*_series(results, ("faiss", kind, "build_s")))
        memory = extrapolate(*_series(results, ("faiss", kind, "memory_bytes")))
        qps = extrapolate(*_series(results, ("faiss", kind, "qps")), QPS_GROWTH[kind])
        lines.append(f"| 21,015,324 *extrapolated* | {kind} | {_fmt(build)} | {_fmt(memory, 0, 1e6)} | "
                     f"{_fmt(memory / WIKI18 if memory else None, 0)} | {_fmt(qps, 1)} | – | – |")
    lines += ["", "## Service (`serve`, BM25, requests of 4 queries, k=3)", "",
              "| passages | clients | requests/s | queries/s | p50 ms | p95 ms | requests per search call | failed |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in measured:
        for clients, row in results["sizes"][str(size)].get("server", {}).items():
            lines.append(f"| {size:,} | {clients} | {_fmt(row['requests_per_s'])} | {_fmt(row['queries_per_s'])} | "
                         f"{_fmt(row['p50_ms'])} | {_fmt(row['p95_ms'])} | {row['requests_per_search_call']:.1f} | "
                         f"{row['failed']} |")
    for clients in ("1", "8", "32"):
        qps = extrapolate(*_series(results, ("server", clients, "queries_per_s")), -1.0)
        p95 = extrapolate(*_series(results, ("server", clients, "p95_ms")), 1.0)
        if qps:
            lines.append(f"| 21,015,324 *extrapolated* | {clients} | {_fmt(qps / 4)} | {_fmt(qps)} | – | {_fmt(p95)} | – | – |")
    for size in measured:
        bm25s, bm25 = results["sizes"][str(size)].get("bm25s"), results["sizes"][str(size)].get("bm25")
        if bm25s and bm25:
            lines += ["", f"## Pyserini vs bm25s at {size:,} passages (one run)", "",
                      "| engine | build s | memory / index GB | batch-512 q/s | top-10 overlap with Pyserini |",
                      "|---|---:|---:|---:|---:|",
                      f"| Pyserini (Lucene, on disk) | {_fmt(bm25['build_s'])} | {_fmt(bm25['index_bytes'], 2, 1e9)} (disk) | "
                      f"{_fmt(bm25['batch512_qps'], 0)} | 1.000 |",
                      f"| bm25s (numpy, in RAM) | {_fmt(bm25s['build_s'])} | {_fmt(bm25s['memory_bytes'], 2, 1e9)} (RSS) | "
                      f"{_fmt(bm25s['batch512_qps'], 0)} | {bm25s['top10_overlap_pyserini']:.3f} |", "",
                      "Same k1=0.9, b=0.4, one thread; bm25s 0.3.16 with its default numpy backend (not numba), "
                      "English stopwords, Snowball stemmer (PyStemmer) against Lucene's Porter stemmer, hence "
                      "top-10 lists that are close but not equal; build = read + tokenize + index."]
    if results.get("compressed_real"):
        lines += ["", "## Compressed FAISS on the real MiniLM vectors of the shared corpus (7,416 × 384)", "",
                  "Recall@10 against flat for the 491 real queries and for 500 passages used as queries; memory "
                  "is the serialized index against flat's 4·d bytes a vector.", "",
                  "| type | params | nprobe | RAM vs flat | recall@10 vs flat (queries) | recall@10 vs flat (passages) "
                  "| golden R@10 (flat: {:.3f}) |".format(results["compressed_real"][0].get("flat_golden_recall10", 0)),
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in results["compressed_real"]:
            if "error" in row:
                lines.append(f"| {row['type']} | failed: {row['error']} | | | | | |")
                continue
            params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "–"
            ram = f"1/{1 / row['memory_vs_flat']:.1f}" + (" (+ fp16 on disk)" if row.get("rerank_candidates") else "")
            lines.append(f"| {row['type']} | {params} | {row['nprobe'] or '–'} | {ram} | "
                         f"{row['recall10_vs_flat']:.3f} | {row['recall10_vs_flat_passage_queries']:.3f} | "
                         f"{row['golden_recall10']:.3f} |")
    if results["meta"].get("notes"):
        lines += ["", "Notes: " + " ".join(results["meta"]["notes"])]
    return "\n".join(lines) + "\n"


def render_readme(results: dict) -> str:
    """Two compact tables for the README: BM25 + the service, and FAISS flat vs IVF-PQ (21M extrapolated)."""
    measured = sorted(int(s) for s in results["sizes"])
    rows = ["| passages | BM25 build s | index GB | batch-512 q/s | p50 / p95 ms | golden R@10 | "
            "serve q/s at 1 / 8 / 32 clients | p95 ms at 32 |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def service(entry, key):
        return " / ".join(_fmt(entry.get("server", {}).get(c, {}).get(key), 0) for c in ("1", "8", "32"))

    for size in measured:
        e = results["sizes"][str(size)]
        b = e.get("bm25", {})
        rows.append(f"| {size:,} | {_fmt(b.get('build_s'), 0)} | {_fmt(b.get('index_bytes'), 2, 1e9)} | "
                    f"{_fmt(b.get('batch512_qps'), 0)} | {_fmt(b.get('p50_ms'))} / {_fmt(b.get('p95_ms'))} | "
                    f"{_fmt(b.get('golden_recall10'), 3)} | {service(e, 'queries_per_s')} | "
                    f"{_fmt(e.get('server', {}).get('32', {}).get('p95_ms'), 0)} |")
    x = {k: extrapolate(*_series(results, ("bm25", k)), GROWTH[k]) for k in ("build_s", "index_bytes", "batch512_qps",
                                                                              "p50_ms", "p95_ms")}
    sx = [extrapolate(*_series(results, ("server", c, "queries_per_s")), -1.0) for c in ("1", "8", "32")]
    px = extrapolate(*_series(results, ("server", "32", "p95_ms")), 1.0)
    rows.append(f"| 21M *extrapolated* | {_fmt(x['build_s'], 0)} | {_fmt(x['index_bytes'], 2, 1e9)} | "
                f"{_fmt(x['batch512_qps'], 0)} | {_fmt(x['p50_ms'])} / {_fmt(x['p95_ms'])} | – | "
                f"{' / '.join(_fmt(v, 1) for v in sx)} | {_fmt(px, 0)} |")
    rows += ["", "| passages | FAISS type | build s | memory MB | q/s | recall@10 vs flat | golden R@10 |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for size in measured:
        for kind, r in results["sizes"][str(size)].get("faiss", {}).items():
            rows.append(f"| {size:,} | {kind} | {_fmt(r['build_s'], 0)} | {_fmt(r['memory_bytes'], 0, 1e6)} | "
                        f"{_fmt(r['qps'], 0)} | {r['recall10_vs_flat']:.3f} | {r['golden_recall10']:.3f} |")
    for kind in ("flat", "ivf-pq"):
        b, m = (extrapolate(*_series(results, ("faiss", kind, k)), 1.0) for k in ("build_s", "memory_bytes"))
        q = extrapolate(*_series(results, ("faiss", kind, "qps")), QPS_GROWTH[kind])
        rows.append(f"| 21M *extrapolated* | {kind} | {_fmt(b, 0)} | {_fmt(m, 0, 1e6)} | {_fmt(q, 1)} | – | – |")
    return "\n".join(rows) + "\n"


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("build time (s)", "build_s"), ("memory / index size (bytes)", None), ("throughput (queries/s)", None)]
    series = {
        "BM25 (Pyserini)": [("bm25", "build_s"), ("bm25", "index_bytes"), ("bm25", "batch512_qps")],
        **{f"FAISS {k}": [("faiss", k, "build_s"), ("faiss", k, "memory_bytes"), ("faiss", k, "qps")]
           for k in FAISS_BENCH},
    }
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for axis, (title, _key), column in zip(axes, panels, range(3)):
        for label, paths in series.items():
            sizes, values = _series(results, paths[column])
            points = [(n, v) for n, v in zip(sizes, values) if v]
            if not points:
                continue
            line = axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)[0]
            growth = QPS_GROWTH.get(label.removeprefix("FAISS "), -1.0) if column == 2 else 1.0
            target = extrapolate(sizes, values, growth)
            if target:
                axis.plot([points[-1][0], WIKI18], [points[-1][1], target], "--", color=line.get_color(), alpha=0.6)
                axis.plot([WIKI18], [target], "o", mfc="none", color=line.get_color())
        axis.axvline(WIKI18, color="grey", lw=0.8, ls=":")
        axis.set(xscale="log", yscale="log", xlabel="passages", title=title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Retrieval cost against corpus size (1 thread; hollow markers at 21M = extrapolated)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main


def main() -> None:
    import platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "retrieval_scale")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "retrieval_scale.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "retrieval_scale.png")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size with an HNSW build (slow on 1 core)")
    parser.add_argument("--pq-m", type=int, default=48, help="IVF-PQ bytes per vector in the size sweep")
    parser.add_argument("--budget-min", type=float, default=30, help="start no new size after this many minutes")
    parser.add_argument("--skip-bm25s", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the sizes already in the saved JSON")
    parser.add_argument("--skip-compressed", action="store_true", help="skip the sweep on the real vectors")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from the saved JSON")
    parser.add_argument("--compressed-only", action="store_true",
                        help="run only the sweep on the real vectors, into the saved JSON")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
        args.markdown.write_text(render_markdown(results), encoding="utf-8")
        render_plot(results, args.plot)

    compressed_path = args.work / "compressed_real.json"
    if args.compressed_only:  # its own file: it can run while a size sweep writes results.json
        encoded = load_or_encode()
        sweep = bench_compressed_real(encoded["passages"], encoded["queries"], encoded["golden"], encoded["ids"])
        compressed_path.write_text(json.dumps(sweep, indent=1), encoding="utf-8")
        return
    if args.report_only:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        if compressed_path.exists():
            results["compressed_real"] = json.loads(compressed_path.read_text(encoding="utf-8"))
        save()
        print(render_readme(results))
        return
    # Import every module the run uses now: a run takes an hour, and a module edited meanwhile
    # must not be half-imported (one new, one old) when a later step first needs it.
    import stepsearch.retrieval.bm25  # noqa: F401
    import stepsearch.retrieval.dense  # noqa: F401
    import stepsearch.retrieval.index  # noqa: F401
    from retrieval_vectors import shared_queries
    from stepsearch.retrieval.corpus import read_corpus

    started = time.monotonic()
    real = read_corpus(SHARED / "corpus" / "multihop_passages.jsonl").passages
    recall_queries = shared_queries(real, SHARED / "raw")
    queries, golden = [q.query for q in recall_queries], [q.golden_ids for q in recall_queries]
    encoded = load_or_encode()
    results = {"meta": {"host": f"{os.cpu_count()} shared CPU cores, Python {platform.python_version()}, "
                                f"{time.strftime('%Y-%m-%d')}", "seed": args.seed, "notes": []},
               "sizes": {}}
    if args.keep and results_path.exists():  # add sizes to an earlier run's results
        results = json.loads(results_path.read_text(encoding="utf-8"))
    if not args.skip_compressed:
        results["compressed_real"] = bench_compressed_real(encoded["passages"], encoded["queries"],
                                                           encoded["golden"], encoded["ids"])
        save()
        print("compressed sweep on the real vectors done", flush=True)
    model = CorpusModel(real)
    for size in args.sizes:
        if (time.monotonic() - started) / 60 > args.budget_min:
            results["meta"]["notes"].append(f"{size:,} not run: the {args.budget_min:g}-minute budget was spent.")
            save()
            break
        work = args.work / str(size)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        entry = results["sizes"].setdefault(str(size), {})
        corpus = work / "corpus.jsonl"
        entry["generate_s"] = _timed(lambda: write_generated_corpus(corpus, size, model, real, args.seed))
        print(f"{size:,}: corpus generated in {entry['generate_s']:.0f} s", flush=True)
        entry["bm25"] = bench_bm25(corpus, work, queries, golden)
        top_ids = entry["bm25"].pop("top_ids")
        save()
        print(f"{size:,}: BM25 {json.dumps(entry['bm25'])}", flush=True)
        entry["server"] = bench_server(work / "bm25", queries)
        save()
        print(f"{size:,}: server {json.dumps(entry['server'])}", flush=True)
        if size == max(args.sizes) and not args.skip_bm25s:
            entry["bm25s"] = bench_bm25s(corpus, queries, top_ids)
            save()
            print(f"{size:,}: bm25s {json.dumps(entry['bm25s'])}", flush=True)
        vectors = clustered_vectors(encoded["passages"], size, args.seed)
        real_rows = dict(zip(real_positions(size, len(real)).tolist(), encoded["ids"]))
        kinds = [k for k in FAISS_BENCH if k != "hnsw" or size <= args.hnsw_max]
        entry["faiss"] = bench_faiss(vectors, encoded["queries"], golden,
                                     lambda row: real_rows.get(int(row), f"gen-{row}"), kinds, args.pq_m)
        if size > args.hnsw_max:
            results["meta"]["notes"].append(f"HNSW not built at {size:,} (one core: too slow); its 21M row "
                                            "extrapolates the smaller sizes.")
        del vectors
        save()
        print(f"{size:,}: FAISS {json.dumps(entry['faiss'])}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {(time.monotonic() - started) / 60:.1f} min; {args.markdown}, {args.plot}", flush=True)


if __name__ == "__main__":
    main()
