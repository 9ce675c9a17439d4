"""A passage store on disk: ``passages.jsonl`` plus an int64 offsets array, read by position.

The dense index maps FAISS row ``i`` to passage ``i``; keeping the texts on disk (not in RAM) keeps
a wiki-18-sized dense index's memory at the vectors plus 8 bytes per passage. Reads use
``os.pread`` so concurrent searches never share a file position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stepsearch.errors import RetrievalError
from stepsearch.retrieval.base import Passage
from stepsearch.retrieval.corpus import parse_corpus_record

PASSAGES_FILE = "passages.jsonl"
OFFSETS_FILE = "passages.offsets.npy"


class DocStoreWriter:
    """Append passages to ``passages.jsonl``; ``close()`` writes the offsets array."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._handle = (self.directory / PASSAGES_FILE).open("wb")
        self._offsets = [0]

    def add(self, passages: Iterable[Passage]) -> None:
        for passage in passages:
            line = json.dumps({"id": passage.id, "title": passage.title, "text": passage.text}, ensure_ascii=False)
            data = (line + "\n").encode("utf-8")
            self._handle.write(data)
            self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> int:
        self._handle.close()
        np.save(self.directory / OFFSETS_FILE, np.asarray(self._offsets, dtype=np.int64))
        return len(self._offsets) - 1


class _OpenFile:
    """Owns the read-only file descriptor ``_fd`` of a store; closes it once."""

    _fd: int | None = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class DocStore(_OpenFile):
    """Read-only access to the passages of a dense index by row number."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            self._offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
            self._fd = os.open(directory / PASSAGES_FILE, os.O_RDONLY)
        except (OSError, ValueError) as err:
            raise RetrievalError(f"dense index {directory} has no readable passage store ({err}); rebuild it") from None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, row: int, score: float = 0.0) -> Passage:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        record = json.loads(os.pread(self._fd, end - start, start).decode("utf-8"))
        return Passage(id=record["id"], title=record["title"], text=record["text"], score=float(score))




OFFSETS_BLOCK = 64 << 20  # bytes read at a time when scanning a corpus for line starts


def scan_line_starts(path: str | Path, progress=None) -> np.ndarray:
    """Byte offsets of the non-empty lines of a JSONL file (a numpy scan at disk speed, no JSON parsing).

    Empty lines (``\n`` or ``\r\n`` alone) are not rows, as when Search-R1 and FlashRAG load the corpus.
    """
    found: list[np.ndarray] = []
    pending: int | None = 0  # a line starts here; its first byte is in the next block
    position = 0
    with open(path, "rb") as handle:
        while block := handle.read(OFFSETS_BLOCK):
            data = np.frombuffer(block, dtype=np.uint8)
            if pending is not None:
                if data[0] not in (10, 13):
                    found.append(np.asarray([pending], dtype=np.int64))
                pending = None
            candidates = np.flatnonzero(data == 10) + 1
            inside = candidates[candidates < len(data)]
            keep = inside[(data[inside] != 10) & (data[inside] != 13)]
            found.append(keep.astype(np.int64) + position)
            if len(candidates) and candidates[-1] == len(data):
                pending = position + len(data)
            position += len(data)
            if progress is not None:
                progress(len(block))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


class JsonlRowStore(_OpenFile):
    """Passages of a corpus JSONL built elsewhere (wiki-18 / FlashRAG layout), by row number.

    Row ``i`` is the ``i``-th non-empty line, which is FAISS vector ``i`` in Search-R1's and
    FlashRAG's indexes. Only line offsets are kept (8 bytes a row, memory-mapped when cached in a
    file); each hit is read and parsed with ``pread`` (thread-safe). A row that does not parse
    raises a :class:`RetrievalError` naming the file, row and byte offset.
    """

    def __init__(self, corpus: str | Path, starts: np.ndarray) -> None:
        self.path = Path(corpus)
        self._starts = starts
        self._size = self.path.stat().st_size
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._starts)

    def get(self, row: int, score: float = 0.0) -> Passage:
        start = int(self._starts[row])
        end = int(self._starts[row + 1]) if row + 1 < len(self._starts) else self._size
        raw = os.pread(self._fd, end - start, start)
        try:
            passage = parse_corpus_record(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise RetrievalError(f"{self.path}: row {row} (byte {start}) is not a corpus record: {reason}") from None
        return Passage(id=passage.id, title=passage.title, text=passage.text, score=float(score))



def corpus_row_starts(corpus: str | Path, cache: str | Path | None = None, progress=None) -> np.ndarray:
    """Line offsets of ``corpus``, from the ``cache`` file (default ``<corpus>.offsets.npy``) when it
    matches the corpus's size and mtime, else scanned and cached there if the folder is writable."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise RetrievalError(f"corpus JSONL not found: {corpus}" if not corpus.exists() else f"corpus is not a file: {corpus}")
    cache = Path(cache) if cache is not None else corpus.with_name(corpus.name + ".offsets.npy")
    stamp_path = cache.with_suffix(".json")
    info = corpus.stat()
    stamp = {"corpus": str(corpus.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    try:
        if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
            return np.load(cache, mmap_mode="r")
    except (OSError, ValueError):
        pass
    starts = scan_line_starts(corpus, progress=progress)
    try:
        np.save(cache, starts)
        stamp_path.write_text(json.dumps(stamp), encoding="utf-8")
    except OSError:
        pass  # a read-only corpus folder: scan again next time
    return starts
