"""Building retrieval indexes from a JSONL corpus, and the metadata that says what an index is.

``build_index(corpus, index_dir, kind)`` validates the corpus line by line (see ``corpus.py``) and
writes one of two layouts, always with a small ``stepsearch_index.json`` that says what it is:

* ``bm25``: a Lucene index under ``index_dir/lucene``, built by Anserini's ``SimpleIndexer`` (the
  class behind Pyserini's ``LuceneIndexer``) from JsonCollection documents ``{"id", "contents"}``
  with stored contents, so hits come back with their text. We stream the corpus to the indexer in
  batches rather than writing a copy of it for ``IndexCollection``: one validating pass, a progress
  bar, and no second 14 GB file for wiki-18.
* ``dense``: ``faiss.index`` (inner product over L2-normalised mean-pooled embeddings of
  ``passage_prefix + contents``; flat or HNSW) and a passage store (``passages.jsonl`` + offsets).

The build happens in a staging directory beside ``index_dir`` and is swapped in at the end, so a
failed or interrupted build never leaves a half index and never destroys the previous one.

A directory holding a plain Lucene index without our metadata (e.g. a Pyserini prebuilt wiki
index) is accepted as ``bm25``. Indexes built elsewhere can also be *attached* (``attach_index``,
``index build --faiss-file``/``--lucene-dir``): an index folder whose metadata points at the
external FAISS file + corpus JSONL or Lucene folder (absolute paths, nothing copied, nothing
re-encoded), after the open-time checks have passed once.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from stepsearch.errors import DataError, RetrievalError
from stepsearch.retrieval.corpus import SkippedLine, iter_corpus, write_corpus
from stepsearch.retrieval.faiss_index import FaissSpec
from stepsearch.retrieval.index_meta import (  # noqa: F401  (re-exported: read_index_meta, IndexMeta)
    _ARTEFACTS,
    FORMAT_VERSION,
    INDEX_KINDS,
    LUCENE_SUBDIR,
    META_FILE,
    IndexMeta,
    _has_lucene_segments,
    read_index_meta,
)
from stepsearch.progress import task_progress
from stepsearch.retrieval.bm25 import BM25Retriever, write_lucene_index
from stepsearch.retrieval.dense import DenseRetriever, write_dense_index
from stepsearch.retrieval.docstore import corpus_row_starts

if TYPE_CHECKING:
    from stepsearch.retrieval.encoder import TextEncoder

logger = logging.getLogger(__name__)

SKIPPED_EXAMPLES = 5


def _check_target(index_dir: Path) -> None:
    """Refuse a file, or a non-empty directory that is not a stepsearch index (we never clobber it)."""
    if index_dir.exists() and not index_dir.is_dir():
        raise RetrievalError(f"index path exists and is a file: {index_dir}")
    if index_dir.is_dir() and any(index_dir.iterdir()) and not (index_dir / META_FILE).exists():
        raise RetrievalError(
            f"{index_dir} exists, is not empty and is not a stepsearch index: choose a new or empty directory"
        )


def _install(staging: Path, index_dir: Path) -> None:
    """Replace the artefacts of ``index_dir`` with the freshly built ones in ``staging``."""
    index_dir.mkdir(parents=True, exist_ok=True)
    _remove_artefacts(index_dir)
    for name in _ARTEFACTS:
        if (staging / name).exists():
            (staging / name).rename(index_dir / name)


def _remove_artefacts(index_dir: Path) -> None:
    for name in reversed(_ARTEFACTS):  # metadata first: the directory stops being an index at once
        target = index_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _progress(show: bool):
    """A rich bar on a terminal; plain lines (stepsearch.progress) when stdout is not one."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return task_progress(lambda: Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
        transient=False,
    ), show)


def build_index(
    corpus: str | Path,
    index_dir: str | Path,
    kind: str = "bm25",
    *,
    encoder: str | TextEncoder | None = None,
    threads: int = 2,
    strict: bool = False,
    show_progress: bool = True,
    query_prefix: str = "query: ",
    passage_prefix: str = "passage: ",
    faiss_index: str | FaissSpec = "flat",
    batch_size: int = 64,
    max_length: int = 256,
) -> Path:
    """Build a ``bm25`` or ``dense`` index of a JSONL corpus into ``index_dir``; returns ``index_dir``.

    Bad corpus lines are skipped (count and first reasons printed) or, with ``strict``, raise
    :class:`DataError` naming ``file:line``. An existing stepsearch index in ``index_dir`` is
    replaced; a non-empty directory that is not one is refused. ``encoder``/prefixes/``faiss_index``/
    ``batch_size``/``max_length`` only matter for ``dense`` (default encoder: the packaged MiniLM;
    a loaded ``TextEncoder`` is used as is; ``faiss_index``: a type name of ``faiss_index.py`` or a
    :class:`FaissSpec` with its parameters).
    """
    if kind not in INDEX_KINDS:
        raise RetrievalError(f"unknown index kind {kind!r}: use one of {', '.join(INDEX_KINDS)}")
    spec = faiss_index if isinstance(faiss_index, FaissSpec) else FaissSpec(type=faiss_index)
    spec.check()
    if not isinstance(threads, int) or threads <= 0:
        raise RetrievalError(f"threads must be a positive integer, got {threads!r}")
    corpus, index_dir = Path(corpus), Path(index_dir)
    if not corpus.is_file():
        raise DataError(f"corpus file not found: {corpus}" if not corpus.exists() else f"corpus is not a file: {corpus}")
    if corpus.stat().st_size == 0:
        raise DataError(f"corpus file is empty: {corpus}")
    _check_target(index_dir)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap in at the end: a failed or interrupted build leaves any
    # previous index untouched and never a half-written one.
    staging = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.building-", dir=index_dir.parent))
    skipped: list[SkippedLine] = []
    started = time.perf_counter()
    try:
        with _progress(show_progress) as progress:
            read_task = progress.add_task(f"reading {corpus.name}", total=corpus.stat().st_size, unit="byte")
            passages = iter_corpus(
                corpus, strict=strict, skipped=skipped, progress=lambda n: progress.advance(read_task, n)
            )
            meta = IndexMeta(kind=kind, count=0, corpus=str(corpus.resolve()))
            if kind == "bm25":
                meta.count = write_lucene_index(passages, staging / LUCENE_SUBDIR, threads=threads)
            else:
                meta.count, meta.dim, meta.encoder, meta.faiss_params = write_dense_index(
                    passages,
                    staging,
                    encoder=encoder,
                    passage_prefix=passage_prefix,
                    faiss_index=spec,
                    batch_size=batch_size,
                    max_length=max_length,
                    threads=threads,
                    progress=progress,
                )
                meta.query_prefix, meta.passage_prefix = query_prefix, passage_prefix
                meta.faiss_index, meta.max_length = spec.type, max_length
        meta.skipped = len(skipped)
        meta.skipped_examples = [str(bad) for bad in skipped[:SKIPPED_EXAMPLES]]
        meta.build_seconds = round(time.perf_counter() - started, 3)
        (staging / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        _install(staging, index_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if skipped:
        logger.warning("skipped %d bad corpus line(s), first: %s", len(skipped), skipped[0])
    return index_dir


def build_index_from_passages(
    passages: Iterable, index_dir: str | Path, kind: str = "bm25", **kwargs
) -> Path:
    """Build an index straight from in-memory passages (``Passage``, dicts or id/title/text objects).

    Meant for tests and small worlds (e.g. the synthetic corpus): a tiny BM25 index builds in about
    a second once the JVM is up. Keyword arguments go to :func:`build_index`.
    """
    kwargs.setdefault("show_progress", False)
    with tempfile.TemporaryDirectory(prefix="stepsearch-corpus-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(passages, corpus)
        built = build_index(corpus, index_dir, kind, **kwargs)
    meta = read_index_meta(built)
    meta.corpus = None  # the temporary file is gone
    (Path(built) / META_FILE).write_text(meta.to_json(), encoding="utf-8")
    return built


def attach_index(
    index_dir: str | Path,
    *,
    faiss_file: str | Path | None = None,
    corpus: str | Path | None = None,
    lucene_dir: str | Path | None = None,
    encoder: str | None = None,
    query_prefix: str = "query: ",
    pooling: str = "mean",
    max_length: int = 256,
    show_progress: bool = True,
) -> Path:
    """Record an index built elsewhere in ``index_dir`` without copying or re-encoding it.

    Dense: ``faiss_file`` (e.g. Search-R1's ``e5_Flat.index``) + ``corpus`` (``wiki-18.jsonl``, row
    ``i`` = vector ``i``) + the ``encoder``/``query_prefix``/``pooling`` the vectors were made with.
    BM25: ``lucene_dir`` (a Pyserini/Anserini index with stored contents or raw documents). The
    open-time checks (vector count = corpus rows, dimension = encoder's, Lucene text stored) run
    once here, so a bad pairing fails now with one line rather than at the first search.
    """
    index_dir = Path(index_dir)
    if (faiss_file is None) == (lucene_dir is None):
        raise RetrievalError("attach either a FAISS file (with its corpus JSONL) or a Lucene index folder")
    if faiss_file is not None and corpus is None:
        raise RetrievalError(f"the FAISS file {faiss_file} needs its corpus JSONL (--corpus): row i is vector i")
    _check_target(index_dir)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.attaching-", dir=index_dir.parent))
    try:
        if faiss_file is not None:
            faiss_file, corpus = Path(faiss_file), Path(corpus)
            if not faiss_file.is_file():
                raise RetrievalError(f"FAISS index file not found: {faiss_file}")
            with _progress(show_progress) as progress:
                task = progress.add_task(f"indexing lines of {corpus.name}", total=corpus.stat().st_size if corpus.is_file() else 0)
                corpus_row_starts(corpus, staging / "corpus.offsets.npy", lambda n: progress.advance(task, n))
            if encoder is not None and Path(encoder).exists():
                encoder = str(Path(encoder).resolve())
            meta = IndexMeta(kind="dense", count=-1, corpus=str(corpus.resolve()), docstore=str(corpus.resolve()),
                             faiss_file=str(faiss_file.resolve()), encoder=encoder, query_prefix=query_prefix,
                             pooling=pooling, max_length=max_length)
            (staging / META_FILE).write_text(meta.to_json(), encoding="utf-8")
            opened = DenseRetriever(staging, mmap=True)  # the checks; mmap: no need to load 64 GB for them
            meta.count, meta.dim, meta.encoder = opened.num_docs, opened.encoder.dim, opened.encoder.name
            meta.faiss_index, meta.faiss_params = "external", opened.describe_faiss()
            opened.close()
        else:
            lucene_dir = Path(lucene_dir).resolve()
            if not _has_lucene_segments(lucene_dir):
                raise RetrievalError(f"{lucene_dir} is not a Lucene index (no segments_* file)")
            meta = IndexMeta(kind="bm25", count=-1, lucene_dir=str(lucene_dir))
            (staging / META_FILE).write_text(meta.to_json(), encoding="utf-8")
            opened = BM25Retriever(staging, threads=1)  # the checks: opens, has documents, stores their text
            meta.count = opened.num_docs
            opened.close()
        (staging / META_FILE).write_text(meta.to_json(), encoding="utf-8")
        _install(staging, index_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index_dir
