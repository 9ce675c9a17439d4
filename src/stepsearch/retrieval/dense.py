"""Dense retrieval: FAISS inner-product search over L2-normalised encoder embeddings.

Passages are encoded as ``passage_prefix + contents`` (``"Title"\\ntext``, as the Search-R1/E5
wiki-18 index does) and queries as ``query_prefix + query``; with unit vectors the inner product
is the cosine similarity. The index is ``IndexFlatIP`` (exact, the paper's setup) or
``IndexHNSWFlat`` (approximate, far less search time on large corpora; ``ef_search`` trades recall
for speed). Encoding runs in chunks so that a large corpus never sits in memory as text.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Passage, check_search_args
from stepsearch.retrieval.docstore import DocStore, DocStoreWriter
from stepsearch.retrieval.encoder import TextEncoder

FAISS_FILE = "faiss.index"
ENCODE_CHUNK = 8192
HNSW_NEIGHBOURS = 32


def _new_faiss_index(dim: int, kind: str):
    import faiss

    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        return index
    return faiss.IndexFlatIP(dim)


def write_dense_index(
    passages: Iterable[Passage],
    index_dir: Path,
    *,
    encoder: str | TextEncoder | None = None,
    passage_prefix: str = "passage: ",
    faiss_index: str = "flat",
    batch_size: int = 64,
    max_length: int = 256,
    threads: int = 2,
    progress=None,
) -> tuple[int, int, str]:
    """Encode and index passages into ``index_dir``; returns (count, dim, encoder name for metadata)."""
    import faiss

    faiss.omp_set_num_threads(int(threads))
    if not isinstance(encoder, TextEncoder):
        encoder_name = encoder
        if encoder is not None and Path(encoder).exists():
            encoder_name = str(Path(encoder).resolve())
        encoder = TextEncoder(encoder_name, max_length=max_length)
    index = _new_faiss_index(encoder.dim, faiss_index)
    store = DocStoreWriter(index_dir)
    task = progress.add_task("encoding passages", total=0) if progress is not None else None
    iterator = iter(passages)
    seen = 0
    try:
        while chunk := list(itertools.islice(iterator, ENCODE_CHUNK)):
            seen += len(chunk)
            if task is not None:
                progress.update(task, total=seen)
            texts = [passage_prefix + p.contents for p in chunk]
            advance = (lambda n: progress.advance(task, n)) if task is not None else None
            index.add(encoder.encode(texts, batch_size=batch_size, progress=advance))
            store.add(chunk)
    finally:
        count = store.close()
    faiss.write_index(index, str(index_dir / FAISS_FILE))
    return count, encoder.dim, encoder.name


class DenseRetriever:
    """Retriever over an index built by ``build_index(kind="dense")``.

    ``encoder`` (name, path or a loaded :class:`TextEncoder`) and ``query_prefix`` default to what
    the index metadata records; the encoder must produce vectors of the index's dimension.
    """

    def __init__(
        self,
        index_dir: str | Path,
        encoder: str | TextEncoder | None = None,
        query_prefix: str | None = None,
        threads: int = 2,
        batch_size: int = 64,
        ef_search: int = 128,
        device: str | None = None,
    ) -> None:
        import faiss

        from stepsearch.retrieval.index import read_index_meta

        self.index_dir = Path(index_dir)
        self.meta = read_index_meta(self.index_dir)
        if self.meta.kind != "dense":
            raise RetrievalError(f"{self.index_dir} is a {self.meta.kind} index, not dense: use BM25Retriever")
        try:
            self._index = faiss.read_index(str(self.index_dir / FAISS_FILE))
        except RuntimeError as err:
            raise RetrievalError(f"cannot read {self.index_dir / FAISS_FILE}: {str(err).splitlines()[0]}") from None
        if hasattr(self._index, "hnsw"):
            self._index.hnsw.efSearch = int(ef_search)
        self._store = DocStore(self.index_dir)
        if len(self._store) != self._index.ntotal:
            raise RetrievalError(
                f"dense index {self.index_dir} is inconsistent ({self._index.ntotal} vectors, "
                f"{len(self._store)} passages); rebuild it"
            )
        if isinstance(encoder, TextEncoder):
            self.encoder = encoder
        else:
            self.encoder = TextEncoder(encoder or self.meta.encoder, max_length=self.meta.max_length or 256, device=device)
        if self.encoder.dim != self._index.d:
            raise RetrievalError(
                f"encoder {self.encoder.name!r} gives {self.encoder.dim}-d vectors but {self.index_dir} holds "
                f"{self._index.d}-d vectors (built with {self.meta.encoder!r})"
            )
        self.query_prefix = self.meta.query_prefix if query_prefix is None else query_prefix
        self.threads, self.batch_size = int(threads), int(batch_size)
        self.num_docs = int(self._index.ntotal)
        faiss.omp_set_num_threads(self.threads)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        check_search_args(queries, k)
        if not queries:
            return []
        vectors = self.encoder.encode([self.query_prefix + q for q in queries], batch_size=self.batch_size)
        scores, rows = self._index.search(vectors, min(int(k), self.num_docs))
        return [
            [self._store.get(int(row), float(score)) for row, score in zip(row_list, score_list) if row >= 0]
            for row_list, score_list in zip(rows, scores)
        ]

    def close(self) -> None:
        self._store.close()

    def __repr__(self) -> str:
        return f"DenseRetriever({str(self.index_dir)!r}, encoder={self.encoder.name!r})"
