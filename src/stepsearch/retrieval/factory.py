"""Building a retriever from configuration (``RetrieverConfig``) or from an index directory.

This is the one place where config becomes a backend, so training, evaluation, the CLI and the
service all select BM25, dense or remote HTTP retrieval the same way; ``cache_size > 0`` wraps
the result in an LRU :class:`~stepsearch.retrieval.cache.CachedRetriever`.

Indexes built elsewhere need no datamodule change: ``kind: dense`` with ``index`` set to a FAISS
*file* (Search-R1's ``e5_Flat.index``) and ``corpus`` to its JSONL (``wiki-18.jsonl``) opens them
directly (``corpus`` is then the document store, never a build input); ``kind: bm25`` with
``index`` set to a Lucene folder built by Pyserini/Anserini opens it as is; an attached index
folder (``index build --faiss-file``/``--lucene-dir``) opens like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Retriever
from stepsearch.retrieval.bm25 import BM25Retriever
from stepsearch.retrieval.cache import CachedRetriever
from stepsearch.retrieval.client import HttpRetriever

RETRIEVER_KINDS = ("bm25", "dense", "http")


@dataclass
class RetrieverConfig:
    """How to get a retriever.

    Attributes:
        kind: ``bm25`` (Pyserini Lucene), ``dense`` (FAISS + encoder) or ``http`` (remote service).
        index: index directory for ``bm25``/``dense``.
        url: service URL for ``http`` (``http://host:port`` or ``.../retrieve``).
        corpus: JSONL corpus; if set and ``index`` does not exist yet, the index is built first.
        encoder: dense encoder name or path (default: what the index recorded, else packaged MiniLM).
        query_prefix: dense query prefix (default: the index's, ``"query: "``).
        passage_prefix: dense passage prefix used when building (default ``"passage: "``).
        threads: search threads (Lucene batch search / FAISS OpenMP) and indexing threads.
        cache_size: LRU entries in front of the retriever; 0 disables the cache.
        timeout_s: per-request timeout of the HTTP client.
        max_retries: HTTP retries after the first attempt (connection errors, timeouts, 5xx).
        backoff_s: first HTTP retry delay; doubles each retry.
        bm25_k1: BM25 term-frequency saturation.
        bm25_b: BM25 length normalisation.
        faiss_index: FAISS type when a dense index is built here (``flat``, ``flat-fp16``, ``hnsw``,
            ``hnsw-sq8``, ``ivf-flat``, ``ivf-sq8``, ``ivf-sq4``, ``ivf-pq`` or a factory string).
        faiss_nlist: IVF lists for that build (default ~4·sqrt(passages)).
        faiss_pq_m: PQ bytes per vector for ``ivf-pq`` (default dim/4).
        faiss_rerank: that build also keeps fp16 vectors on disk to re-rank candidates exactly.
        rerank_candidates: candidates re-ranked per query when the index has them (default 100, 0 = off).
        nprobe: IVF lists visited per query (default 32).
        ef_search: HNSW candidate list per query (default 128).
        mmap: memory-map the FAISS codes instead of loading them.
        faiss_gpu: put the FAISS index on all visible GPUs (sharded, fp16), as Search-R1's ``--faiss_gpu``.
        pooling: dense encoder pooling, ``mean`` or ``cls`` (default: the index's, else mean).
    """

    kind: str = "bm25"
    index: str | None = None
    url: str | None = None
    corpus: str | None = None
    encoder: str | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    threads: int = 2
    cache_size: int = 0
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    faiss_index: str = "flat"
    faiss_nlist: int | None = None
    faiss_pq_m: int | None = None
    faiss_rerank: bool = False
    rerank_candidates: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    mmap: bool = False
    faiss_gpu: bool = False
    pooling: str | None = None


def _ensure_index(config: RetrieverConfig) -> Path:
    if not config.index:
        raise RetrievalError(f"retriever kind {config.kind!r} needs an index directory (retriever.index)")
    index_dir = Path(config.index)
    from stepsearch.retrieval.faiss_index import FaissSpec  # lazy: loads numpy
    from stepsearch.retrieval.index import META_FILE, build_index  # lazy: loads numpy

    if index_dir.is_file():  # a FAISS file built elsewhere: nothing to build
        if config.kind != "dense":
            raise RetrievalError(f"retriever.index {index_dir} is a file: a FAISS index needs kind 'dense', "
                                 "a BM25 index is a Lucene folder")
        return index_dir
    if config.corpus and not (index_dir / META_FILE).exists() and not (index_dir.is_dir() and any(index_dir.iterdir())):
        build_index(
            config.corpus,
            index_dir,
            config.kind,
            encoder=config.encoder,
            threads=config.threads,
            query_prefix="query: " if config.query_prefix is None else config.query_prefix,
            passage_prefix="passage: " if config.passage_prefix is None else config.passage_prefix,
            faiss_index=FaissSpec(type=config.faiss_index, nlist=config.faiss_nlist, pq_m=config.faiss_pq_m,
                                  rerank=config.faiss_rerank),
        )
    return index_dir


def build_retriever(config: RetrieverConfig) -> Retriever:
    """Make the retriever ``config`` describes (building the index from ``corpus`` if needed)."""
    if config.kind not in RETRIEVER_KINDS:
        raise RetrievalError(f"unknown retriever kind {config.kind!r}: use one of {', '.join(RETRIEVER_KINDS)}")
    if not isinstance(config.cache_size, int) or config.cache_size < 0:
        raise RetrievalError(f"cache_size must be an integer >= 0, got {config.cache_size!r}")
    retriever: Retriever
    if config.kind == "http":
        if not config.url:
            raise RetrievalError("retriever kind 'http' needs a service URL (retriever.url)")

        retriever = HttpRetriever(
            config.url, timeout_s=config.timeout_s, max_retries=config.max_retries, backoff_s=config.backoff_s
        )
    elif config.kind == "bm25":
        retriever = BM25Retriever(_ensure_index(config), threads=config.threads, k1=config.bm25_k1, b=config.bm25_b)
    else:
        from stepsearch.retrieval.dense import DenseRetriever  # lazy: loads numpy

        index = _ensure_index(config)
        retriever = DenseRetriever(
            index, encoder=config.encoder, query_prefix=config.query_prefix, threads=config.threads,
            nprobe=config.nprobe, ef_search=config.ef_search, mmap=config.mmap, faiss_gpu=config.faiss_gpu,
            rerank_candidates=config.rerank_candidates,
            corpus=config.corpus if index.is_file() else None, pooling=config.pooling,
        )
    if config.cache_size:
        retriever = CachedRetriever(retriever, config.cache_size)
    return retriever


def index_kind(index: str | Path) -> str:
    """``dense`` for a FAISS file, else the kind an index folder's metadata (or Lucene files) says."""
    from stepsearch.retrieval.index import read_index_meta  # lazy: loads numpy

    return "dense" if Path(index).is_file() else read_index_meta(index).kind


def load_retriever(index_dir: str | Path, **options) -> Retriever:
    """Open an index directory with the backend its metadata names (``bm25`` or ``dense``).

    ``options`` go to the backend (e.g. ``threads``, ``k1``/``b`` for BM25, ``encoder`` for dense).
    """
    from stepsearch.retrieval.index import read_index_meta  # lazy: loads numpy

    if Path(index_dir).is_file():  # a bare FAISS file: options must name its corpus
        from stepsearch.retrieval.dense import DenseRetriever  # lazy: loads numpy

        return DenseRetriever(index_dir, **options)
    meta = read_index_meta(index_dir)
    if meta.kind == "bm25":
        return BM25Retriever(index_dir, **options)
    from stepsearch.retrieval.dense import DenseRetriever  # lazy: loads numpy

    return DenseRetriever(index_dir, **options)
