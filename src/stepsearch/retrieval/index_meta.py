"""What an index directory is: its ``stepsearch_index.json`` metadata (:class:`IndexMeta`) and the
reader that every retriever opens an index with. Split from ``index`` (which builds indexes and
imports the BM25 and dense writers), so the retrievers can read metadata without importing it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from stepsearch.errors import RetrievalError

META_FILE = "stepsearch_index.json"
SKIPPED_EXAMPLES = 5
LUCENE_SUBDIR = "lucene"
FORMAT_VERSION = 1
INDEX_KINDS = ("bm25", "dense")
# Files and folders an index build writes; a rebuild removes exactly these.
# (the metadata goes last when installing, so a reader never sees it before the data)
_ARTEFACTS = (LUCENE_SUBDIR, "faiss.index", "rerank.f16.npy", "passages.jsonl", "passages.offsets.npy", "corpus.offsets.npy",
              "corpus.offsets.json", META_FILE)


@dataclass
class IndexMeta:
    """What ``stepsearch_index.json`` records about an index (enough for ``load_retriever``)."""

    kind: str
    count: int
    corpus: str | None = None
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # first few "file:line: reason"
    encoder: str | None = None
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int | None = None
    dim: int | None = None
    faiss_index: str | None = None
    faiss_params: dict = field(default_factory=dict)  # nlist, pq_m, ... and the FAISS class
    build_seconds: float | None = None
    format_version: int = FORMAT_VERSION
    lucene_dir: str = LUCENE_SUBDIR  # relative to the index dir ("." for a plain Lucene index), or absolute
    faiss_file: str | None = None  # relative to the index dir (default faiss.index), or absolute (attached)
    docstore: str | None = None  # corpus JSONL of an attached FAISS index (row i = vector i)
    pooling: str | None = None  # encoder pooling (mean, cls); None = mean

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _has_lucene_segments(path: Path) -> bool:
    return any(path.glob("segments_*"))


def read_index_meta(index_dir: str | Path) -> IndexMeta:
    """Read an index directory's metadata; raise :class:`RetrievalError` if it is not an index."""
    index_dir = Path(index_dir)
    hint = f"build one with `python -m stepsearch index build --corpus FILE.jsonl --index {index_dir}`"
    if not index_dir.exists():
        raise RetrievalError(f"index directory not found: {index_dir} ({hint})")
    if not index_dir.is_dir():
        raise RetrievalError(f"index must be a directory, got a file: {index_dir}")
    meta_path = index_dir / META_FILE
    if not meta_path.exists():
        if _has_lucene_segments(index_dir):
            return IndexMeta(kind="bm25", count=-1, lucene_dir=".")
        raise RetrievalError(f"{index_dir} is not an index (no {META_FILE}, no Lucene segments_* file); {hint}")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(IndexMeta)}
        meta = IndexMeta(**{key: value for key, value in raw.items() if key in known})
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as err:
        raise RetrievalError(f"{meta_path} is not valid index metadata ({err}); rebuild the index") from None
    if meta.kind not in INDEX_KINDS:
        raise RetrievalError(f"{meta_path}: unknown index kind {meta.kind!r} (expected one of {', '.join(INDEX_KINDS)})")
    return meta
