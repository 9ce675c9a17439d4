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


class DocStore:
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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
