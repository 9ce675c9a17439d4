"""MiniLM vectors of the shared corpus and its recall queries, encoded once and cached.

Encoding the 7,416 shared passages with the packaged all-MiniLM-L6-v2 takes ~6 minutes on two CPU
cores, and the FAISS comparisons (``benchmarks/retrieval_scale.py``, the compressed-index acceptance
numbers) need them again and again. This module encodes them exactly as a dense index does
(``"passage: " + contents``, max 256 tokens, mean pooling, L2-normalised) and the MuSiQue
sub-questions + HotpotQA questions as ``"query: " + query``, and keeps them in ``--cache``
(default ``runs/retrieval_cache/``, git-ignored) as ``.npy`` files keyed by the corpus size.

Run by hand: ``nice -n 10 .venv/bin/python benchmarks/retrieval_vectors.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SHARED = Path(os.environ.get("STEPSEARCH_SHARED", REPO.parent / "shared")) / "data"
DEFAULT_CACHE = REPO / "runs" / "retrieval_cache"
MAX_LENGTH = 256


def shared_queries(corpus_passages, raw_dir: Path):
    """The recall queries of ``benchmarks/retrieval.py``: MuSiQue sub-questions, then HotpotQA questions."""
    from stepsearch.retrieval.recall import PassageLookup, hotpot_question_queries, load_raw_rows, musique_subquestion_queries

    lookup = PassageLookup(corpus_passages)
    return musique_subquestion_queries(load_raw_rows(raw_dir / "musique_ans_dev_sample.jsonl"), lookup) + \
        hotpot_question_queries(load_raw_rows(raw_dir / "hotpot_dev_distractor_sample.json"), lookup)


def load_or_encode(corpus: Path = SHARED / "corpus" / "multihop_passages.jsonl", raw_dir: Path = SHARED / "raw",
                   cache: Path = DEFAULT_CACHE, threads: int = 2) -> dict:
    """``{"passages": (N, 384), "queries": (Q, 384), "ids": [...], "query_texts": [...]}`` (float32)."""
    from stepsearch.retrieval.corpus import read_corpus

    passages = read_corpus(corpus).passages
    queries = shared_queries(passages, raw_dir)
    stem = f"minilm_{corpus.stem}_{len(passages)}"
    files = {name: cache / f"{stem}.{name}.npy" for name in ("passages", "queries")}
    if not all(path.exists() for path in files.values()):
        import torch

        from stepsearch.retrieval.encoder import TextEncoder

        torch.set_num_threads(threads)
        cache.mkdir(parents=True, exist_ok=True)
        encoder = TextEncoder(max_length=MAX_LENGTH)
        started = time.perf_counter()
        query_vectors = encoder.encode(["query: " + q.query for q in queries])
        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            if done[0] % 1024 < n:
                print(f"encoded {done[0]}/{len(passages)} passages ({time.perf_counter() - started:.0f} s)", flush=True)

        passage_vectors = encoder.encode(["passage: " + p.contents for p in passages], progress=progress)
        np.save(files["queries"], query_vectors)
        np.save(files["passages"], passage_vectors)
        (cache / f"{stem}.json").write_text(json.dumps({
            "encoder": encoder.name, "max_length": MAX_LENGTH, "seconds": round(time.perf_counter() - started, 1),
            "passages": len(passages), "queries": len(queries)}), encoding="utf-8")
    return {
        "passages": np.load(files["passages"]),
        "queries": np.load(files["queries"]),
        "ids": [p.id for p in passages],
        "query_texts": [q.query for q in queries],
        "golden": [q.golden_ids for q in queries],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    vectors = load_or_encode(cache=args.cache, threads=args.threads)
    print(f"passages {vectors['passages'].shape}, queries {vectors['queries'].shape} cached in {args.cache}")


if __name__ == "__main__":
    main()
