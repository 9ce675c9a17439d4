"""BM25 retrieval over a Lucene index with Pyserini's engine (Anserini ``SimpleSearcher``).

Scoring is Lucene's BM25 with Anserini's defaults for passage corpora (k1=0.9, b=0.4) and its
default English analyzer (Porter stemming, stopwords removed). Batches of queries go through
``batch_search`` with a Java thread pool of ``threads`` workers, exactly as Pyserini's
``LuceneSearcher.batch_search`` does; a single query takes the plain ``search`` path. All Java
calls hold ``JVM_LOCK`` (see ``_lucene.py``): concurrent callers are serialized, never corrupted.

An index built elsewhere (a Pyserini prebuilt wiki index, an Anserini ``IndexCollection`` run) is
opened as is; at open time we check that its documents carry their text (a stored ``contents`` or
``raw`` field), since a hit without text is useless to the policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from stepsearch.errors import RetrievalError
from stepsearch.retrieval._lucene import JVM_LOCK, java_error_message, lucene
from stepsearch.retrieval.index_meta import read_index_meta
from stepsearch.retrieval.base import Passage, check_search_args, split_contents

INDEX_BATCH = 2000


def write_lucene_index(passages: Iterable[Passage], lucene_dir: Path, threads: int = 2) -> int:
    """Index passages as JsonCollection documents ``{"id", "contents"}`` (stored); returns the count."""
    java = lucene()
    from jnius import JavaException

    args = ["-index", str(lucene_dir), "-input", "", "-collection", "JsonCollection",
            "-threads", str(int(threads)), "-storeContents"]
    try:
        with JVM_LOCK:
            indexer = java.SimpleIndexer(args)
    except JavaException as err:
        raise RetrievalError(f"cannot create a Lucene index in {lucene_dir}: {java_error_message(err)}") from None
    count = 0
    batch: list[str] = []
    try:
        for passage in passages:
            batch.append(json.dumps({"id": passage.id, "contents": passage.contents}, ensure_ascii=False))
            if len(batch) >= INDEX_BATCH:
                count += _add_batch(indexer, batch)
                batch = []
        if batch:
            count += _add_batch(indexer, batch)
    finally:
        try:
            with JVM_LOCK:
                indexer.close()
        except JavaException as err:
            raise RetrievalError(f"Lucene could not finish the index in {lucene_dir}: {java_error_message(err)}") from None
    return count


def _add_batch(indexer, batch: list[str]) -> int:
    from jnius import JavaException

    try:
        with JVM_LOCK:
            added = indexer.addRawDocuments(batch)
    except JavaException as err:
        raise RetrievalError(f"Lucene indexing failed: {java_error_message(err)}") from None
    if added != len(batch):
        raise RetrievalError(f"Lucene indexed {added} of {len(batch)} documents in a batch; see the log above")
    return added


def _document_contents(document) -> str | None:
    """The ``"Title"\ntext`` of a stored Lucene document (``contents``, else the ``raw`` JSON)."""
    if document is None:
        return None
    contents = document.get("contents")
    if contents is None and document.get("raw") is not None:
        # Pyserini prebuilt indexes may store only the raw JSON document.
        try:
            raw = json.loads(document.get("raw"))
        except json.JSONDecodeError:
            return document.get("raw")
        if isinstance(raw, dict):
            contents = raw.get("contents") or f'"{raw.get("title", "")}"\n{raw.get("text", "")}'
    return contents


def _passage_from_hit(hit) -> Passage:
    title, text = split_contents(_document_contents(hit.lucene_document) or "")
    return Passage(id=str(hit.docid), title=title, text=text, score=float(hit.score))


class BM25Retriever:
    """Retriever over a Lucene index built by ``build_index(kind="bm25")`` (or any Pyserini index
    that stores ``contents`` or ``raw``)."""

    def __init__(self, index_dir: str | Path, threads: int = 2, k1: float = 0.9, b: float = 0.4) -> None:
        self.index_dir = Path(index_dir)
        self.meta = read_index_meta(self.index_dir)
        if self.meta.kind != "bm25":
            raise RetrievalError(f"{self.index_dir} is a {self.meta.kind} index, not bm25: use DenseRetriever")
        if not isinstance(threads, int) or threads <= 0:
            raise RetrievalError(f"threads must be a positive integer, got {threads!r}")
        if k1 < 0 or not 0 <= b <= 1:
            raise RetrievalError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.threads, self.k1, self.b = threads, float(k1), float(b)
        java = lucene()
        from jnius import JavaException

        lucene_dir = (self.index_dir / self.meta.lucene_dir).resolve()
        try:
            with JVM_LOCK:
                self._searcher = java.SimpleSearcher(str(lucene_dir))
                self._searcher.set_bm25(self.k1, self.b)
                self.num_docs = int(self._searcher.get_total_num_docs())
                first = self._searcher.doc(0) if self.num_docs else None
                stored = _document_contents(first) is not None
        except JavaException as err:
            raise RetrievalError(f"cannot open Lucene index {lucene_dir}: {java_error_message(err)}") from None
        problem = None
        if self.num_docs == 0:
            problem = f"Lucene index {lucene_dir} holds no documents; index a corpus into it first"
        elif not stored:
            problem = (
                f"Lucene index {lucene_dir} does not store document text (no 'contents' or 'raw' field): "
                "rebuild it with -storeContents or -storeRaw (e.g. the full, not the slim, Pyserini prebuilt index)"
            )
        elif self.meta.count >= 0 and self.meta.count != self.num_docs:
            problem = (f"Lucene index {lucene_dir} holds {self.num_docs} documents but its metadata says "
                       f"{self.meta.count}; rebuild the index")
        if problem is not None:
            self.close()  # the caller never gets this object: release the Lucene reader now
            raise RetrievalError(problem)
        self._java = java

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        check_search_args(queries, k)
        if not queries:
            return []
        from jnius import JavaException

        if self._searcher is None:
            raise RetrievalError(f"the BM25 retriever over {self.index_dir} is closed")
        try:
            with JVM_LOCK:
                if len(queries) == 1:
                    return [[_passage_from_hit(h) for h in self._searcher.search(queries[0], int(k))]]
                query_list, id_list = self._java.ArrayList(), self._java.ArrayList()
                for position, query in enumerate(queries):
                    query_list.add(query)
                    id_list.add(str(position))
                results = self._searcher.batch_search(query_list, id_list, int(k), int(self.threads))
                by_id = {entry.getKey(): entry.getValue() for entry in results.entrySet().toArray()}
                missing = [p for p in range(len(queries)) if str(p) not in by_id]
                if not missing:
                    return [[_passage_from_hit(h) for h in by_id[str(p)]] for p in range(len(queries))]
        except JavaException as err:
            raise RetrievalError(f"BM25 search failed: {java_error_message(err)}") from None
        raise RetrievalError(f"BM25 batch search returned no result for query position(s) {missing[:5]}")

    def describe(self) -> dict:
        """Backend facts for ``/health`` and logs."""
        return {"retriever": type(self).__name__, "kind": "bm25", "index": str(self.index_dir),
                "num_docs": self.num_docs, "k1": self.k1, "b": self.b}

    def close(self) -> None:
        """Release the Lucene reader (the searcher cannot be used afterwards)."""
        searcher, self._searcher = getattr(self, "_searcher", None), None
        if searcher is not None:
            try:
                with JVM_LOCK:
                    searcher.close()
            except Exception:  # noqa: BLE001 - closing twice or after JVM shutdown is harmless
                pass

    def __repr__(self) -> str:
        return f"BM25Retriever({str(self.index_dir)!r}, threads={self.threads}, k1={self.k1}, b={self.b})"
