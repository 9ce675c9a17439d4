"""Dense retrieval: FAISS inner-product search over L2-normalised encoder embeddings.

Passages are encoded as ``passage_prefix + contents`` (``"Title"\\ntext``, as the Search-R1/E5
wiki-18 index does) and queries as ``query_prefix + query``; with unit vectors the inner product
is the cosine similarity. The FAISS index type comes by name (``faiss_index.py``: flat, fp16, HNSW,
IVF-SQ, IVF-PQ or any factory string); trained types are trained on a uniform sample of the
corpus's vectors, which are spilled to a float32 file in the staging folder while encoding (the
corpus never sits in memory as text or as vectors).

An index built elsewhere opens without re-encoding: a FAISS file plus its corpus JSONL in the
Search-R1/FlashRAG layout (``e5_Flat.index`` + ``wiki-18.jsonl``, row ``i`` = vector ``i``), given
directly (``DenseRetriever("e5_Flat.index", corpus="wiki-18.jsonl", encoder=...)``) or recorded
in an index folder's metadata (``index attach``). At open time the vector count must equal the
corpus rows and the dimension the encoder's: each mismatch is one error line.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.index_meta import IndexMeta, read_index_meta
from stepsearch.retrieval.base import Passage, check_search_args
from stepsearch.retrieval.docstore import DocStore, DocStoreWriter, JsonlRowStore, corpus_row_starts
from stepsearch.retrieval.encoder import TextEncoder
from stepsearch.retrieval.faiss_index import (
    RERANK_FILE,
    FaissSpec,
    describe_index,
    new_index,
    read_faiss,
    set_search_params,
    to_gpu,
    rerank,
    train,
    train_sample_rows,
    write_faiss,
    write_rerank_vectors,
)

FAISS_FILE = "faiss.index"
ENCODE_CHUNK = 8192
ADD_CHUNK = 65536
TRAINED_LATER = ("ivf-flat", "ivf-sq8", "ivf-sq4", "ivf-pq", "hnsw-sq8")


def _load_encoder(encoder, max_length: int, pooling: str = "mean", device: str | None = None) -> TextEncoder:
    if isinstance(encoder, TextEncoder):
        return encoder
    name = encoder
    if encoder is not None and Path(encoder).exists():
        name = str(Path(encoder).resolve())
    return TextEncoder(name, max_length=max_length, pooling=pooling, device=device)


def write_dense_index(
    passages: Iterable[Passage],
    index_dir: Path,
    *,
    encoder: str | TextEncoder | None = None,
    passage_prefix: str = "passage: ",
    faiss_index: str | FaissSpec = "flat",
    batch_size: int = 64,
    max_length: int = 256,
    threads: int = 2,
    progress=None,
) -> tuple[int, int, str, dict]:
    """Encode and index passages into ``index_dir``; returns (count, dim, encoder name, FAISS facts)."""
    import faiss

    faiss.omp_set_num_threads(int(threads))
    spec = faiss_index if isinstance(faiss_index, FaissSpec) else FaissSpec(type=faiss_index)
    spec.check()
    encoder = _load_encoder(encoder, max_length)
    streamed = spec.type not in TRAINED_LATER and spec.type[:1].islower() and not spec.rerank
    index = new_index(spec, encoder.dim, 0) if streamed else None
    store = DocStoreWriter(index_dir)
    spill_path = Path(tempfile.mkstemp(prefix="vectors-", suffix=".f32", dir=index_dir)[1])
    task = progress.add_task("encoding passages", total=0) if progress is not None else None
    iterator = iter(passages)
    seen = 0
    try:
        with spill_path.open("wb") as spill:
            while chunk := list(itertools.islice(iterator, ENCODE_CHUNK)):
                seen += len(chunk)
                if task is not None:
                    progress.update(task, total=seen)
                texts = [passage_prefix + p.contents for p in chunk]
                advance = (lambda n: progress.advance(task, n)) if task is not None else None
                vectors = encoder.encode(texts, batch_size=batch_size, progress=advance)
                if streamed:
                    index.add(vectors)
                else:
                    vectors.tofile(spill)
                store.add(chunk)
        count = store.close()
        if not streamed:
            spilled = np.memmap(spill_path, np.float32, "r", shape=(count, encoder.dim))
            index = _train_and_add(spec, spilled, progress)
            if spec.rerank:
                write_rerank_vectors(spilled, index_dir / RERANK_FILE)
            del spilled
    finally:
        spill_path.unlink(missing_ok=True)
    write_faiss(index, index_dir / FAISS_FILE)
    return count, encoder.dim, encoder.name, {**describe_index(index), **spec.params()}


def _train_and_add(spec: FaissSpec, vectors: np.ndarray, progress=None):
    """A trained index of ``vectors`` (rows in order): train on a seeded uniform sample, add in chunks."""
    count, dim = vectors.shape
    index = new_index(spec, dim, count)
    rows = train_sample_rows(spec, count, getattr(index, "nlist", None))
    task = progress.add_task(f"training FAISS {spec.type} on {len(rows):,} vectors", total=None) if progress else None
    train(index, np.asarray(vectors[rows]), seed=spec.seed)
    if task is not None:
        progress.update(task, total=1, completed=1)
        task = progress.add_task("adding vectors", total=count)
    for start in range(0, count, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK]))
        if task is not None:
            progress.advance(task, min(ADD_CHUNK, count - start))
    return index


def build_faiss_from_vectors(vectors: np.ndarray, spec: FaissSpec | str, threads: int = 1):
    """An index of ``vectors`` (float32, unit rows) of the given type: the benchmark's entry point."""
    import faiss

    faiss.omp_set_num_threads(int(threads))
    spec = spec if isinstance(spec, FaissSpec) else FaissSpec(type=spec)
    return _train_and_add(spec, vectors)


class DenseRetriever:
    """Retriever over a dense index folder, or over a FAISS file + corpus JSONL built elsewhere.

    Args:
        index_dir: an index folder (``build_index(kind="dense")`` or ``attach_dense_index``), or a
            FAISS index file (then ``corpus`` is required).
        corpus: the corpus JSONL of a bare FAISS file (row ``i`` = vector ``i``).
        encoder / query_prefix / pooling / max_length: default to what the metadata records; for
            a bare FAISS file: the packaged MiniLM, ``"query: "``, mean pooling, 256 tokens.
        nprobe / ef_search: IVF lists visited / HNSW candidates (defaults 32 / 128).
        rerank_candidates: with a re-ranking index (``rerank.f16.npy``), rows fetched from the
            compressed index and re-scored exactly (default 100; 0 turns re-ranking off).
        mmap: map the vector codes from the file instead of loading them.
        faiss_gpu: clone the index onto all GPUs (sharded, fp16), as Search-R1's ``--faiss_gpu``.
    """

    def __init__(
        self,
        index_dir: str | Path,
        encoder: str | TextEncoder | None = None,
        query_prefix: str | None = None,
        threads: int = 2,
        batch_size: int = 64,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rerank_candidates: int | None = None,
        mmap: bool = False,
        faiss_gpu: bool = False,
        corpus: str | Path | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        device: str | None = None,
    ) -> None:
        import faiss

        self.index_dir = Path(index_dir)
        if self.index_dir.is_file():  # a FAISS file built elsewhere, with its corpus JSONL
            if corpus is None:
                raise RetrievalError(f"{self.index_dir} is a FAISS file: give its corpus JSONL too (retriever.corpus / --corpus)")
            self.meta = IndexMeta(kind="dense", count=-1, faiss_file=str(self.index_dir.resolve()),
                                  docstore=str(Path(corpus).resolve()), query_prefix="query: ")
            offsets_cache = None
        else:
            self.meta = read_index_meta(self.index_dir)
            offsets_cache = self.index_dir / "corpus.offsets.npy"
        if self.meta.kind != "dense":
            raise RetrievalError(f"{self.index_dir} is a {self.meta.kind} index, not dense: use BM25Retriever")
        faiss_path = Path(self.meta.faiss_file or FAISS_FILE)
        faiss_path = faiss_path if faiss_path.is_absolute() else self.index_dir / faiss_path
        if not faiss_path.is_file():
            raise RetrievalError(f"FAISS index file not found: {faiss_path}")
        self._index = read_faiss(faiss_path, mmap=mmap)
        set_search_params(self._index, nprobe=nprobe or 32, ef_search=ef_search or 128)
        if self.meta.docstore:
            self._store = JsonlRowStore(self.meta.docstore, corpus_row_starts(self.meta.docstore, offsets_cache))
            what = f"corpus {self.meta.docstore} has {len(self._store)} rows"
        else:
            self._store = DocStore(self.index_dir)
            what = f"its passage store has {len(self._store)} passages"
        try:  # a failed check must not leave the passage store open
            if len(self._store) != self._index.ntotal:
                raise RetrievalError(f"FAISS index {faiss_path} holds {self._index.ntotal} vectors but {what}: "
                                     "vector i must be row i of the same corpus")
            self.encoder = _load_encoder(encoder or self.meta.encoder, max_length or self.meta.max_length or 256,
                                         pooling or self.meta.pooling or "mean", device)
            if self.encoder.dim != self._index.d:
                raise RetrievalError(
                    f"encoder {self.encoder.name!r} gives {self.encoder.dim}-d vectors but FAISS index {faiss_path} "
                    f"holds {self._index.d}-d vectors: use the encoder the index was built with "
                    "(retriever.encoder / --encoder)"
                )
            self.query_prefix = self.meta.query_prefix if query_prefix is None else query_prefix
            self.threads, self.batch_size = int(threads), int(batch_size)
            self.num_docs = int(self._index.ntotal)
            self.faiss_path, self.mmap, self.gpu = faiss_path, bool(mmap), bool(faiss_gpu)
            self._facts = describe_index(self._index)
            rerank_path = self.index_dir / RERANK_FILE
            self._rerank = None
            if rerank_path.is_file() and rerank_candidates != 0:
                self._rerank = np.load(rerank_path, mmap_mode="r")
                if self._rerank.shape != (self.num_docs, self._index.d):
                    raise RetrievalError(f"{rerank_path} holds {self._rerank.shape} vectors, not ({self.num_docs}, "
                                         f"{self._index.d}): rebuild the index")
                self._facts["rerank_candidates"] = int(rerank_candidates or 100)
            if faiss_gpu:
                self._index = to_gpu(self._index)
        except BaseException:
            self._store.close()
            raise
        faiss.omp_set_num_threads(self.threads)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        check_search_args(queries, k)
        if not queries:
            return []
        vectors = self.encoder.encode([self.query_prefix + q for q in queries], batch_size=self.batch_size)
        return self.search_vectors(vectors, k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Passage]]:
        """Search with query vectors already encoded (``(n, dim)`` float32, unit rows)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        k = min(int(k), self.num_docs)
        if self._rerank is not None:
            candidates = self._index.search(vectors, min(max(k, self._facts["rerank_candidates"]), self.num_docs))[1]
            scores, rows = rerank(vectors, candidates, self._rerank, k)
        else:
            scores, rows = self._index.search(vectors, k)
        return [
            [self._store.get(int(row), float(score)) for row, score in zip(row_list, score_list) if row >= 0]
            for row_list, score_list in zip(rows, scores)
        ]

    def describe(self) -> dict:
        """Backend facts for ``/health`` and logs."""
        return {"retriever": type(self).__name__, "kind": "dense", "index": str(self.index_dir),
                "num_docs": self.num_docs, "encoder": self.encoder.name, "query_prefix": self.query_prefix,
                "faiss_file": str(self.faiss_path), "faiss_type": self.meta.faiss_index, **self._facts,
                "mmap": self.mmap, "gpu": self.gpu, "corpus": self.meta.docstore}

    def describe_faiss(self) -> dict:
        """The FAISS class and shape (for metadata)."""
        return dict(self._facts)

    def close(self) -> None:
        self._store.close()

    def __repr__(self) -> str:
        return f"DenseRetriever({str(self.index_dir)!r}, encoder={self.encoder.name!r})"
