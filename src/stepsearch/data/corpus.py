"""Retrieval-corpus passages: stable ids, and writing the wiki-18 layout.

Passage ids are ``{prefix}-{md5(title + "\\n" + text)[:12]}`` with the prefix the canonical source
dataset name (``musique``, ``hotpotqa``, ``2wikimultihopqa``...). The id depends only on the
paragraph's content, so the same paragraph read from two files (train and dev, or two runs) gets
the same id, and the golden passages of an example can be written without a lookup table. This is
exactly the scheme of the shared corpus ``multihop_passages.jsonl``: ids built here from the raw
HotpotQA/MuSiQue/2Wiki files equal the ids there. The prefix keeps the three sources apart (their
paragraph texts come from different Wikipedia dumps). 48 bits of md5 keep a collision improbable
at the size of one source (~4e-5 for MuSiQue's ~140k paragraphs, ~2e-3 at 1M); ``write_corpus``
checks the full digest and refuses to merge two different paragraphs under one id.

File layout (Pyserini JsonCollection / wiki-18): one ``{"id", "contents": "\\"Title\\"\\ntext"}``
per line; read it back with :func:`stepsearch.retrieval.corpus.read_corpus`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from stepsearch.errors import DataError
from stepsearch.retrieval.base import Passage


def passage_id(prefix: str, title: str, text: str) -> str:
    """The stable corpus id of a paragraph (see the module docstring)."""
    digest = hashlib.md5(f"{title}\n{text}".encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}" if prefix else digest


def make_passage(prefix: str, title: str, text: str) -> Passage:
    """A corpus passage with whitespace trimmed and its stable id (so it round-trips verbatim)."""
    title, text = title.strip(), text.strip()
    return Passage(id=passage_id(prefix, title, text), title=title, text=text)


def write_corpus(passages: Iterable[Passage], path: str | Path) -> int:
    """Write passages as wiki-18 JSONL, one per id (first occurrence kept). Returns the count.

    Raises :class:`DataError` when two different paragraphs share an id (a hash collision).
    """
    path = Path(path)
    try:
        return _write_unique(passages, path)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None


def _write_unique(passages: Iterable[Passage], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    with path.open("w", encoding="utf-8") as f:
        for p in passages:
            digest = hashlib.md5(f"{p.title}\n{p.text}".encode("utf-8")).hexdigest()
            if p.id in digests:
                if digests[p.id] != digest:
                    raise DataError(f"{path}: two different paragraphs share id {p.id!r} (hash collision); the second is titled {p.title!r}")
                continue
            digests[p.id] = digest
            f.write(json.dumps({"id": p.id, "contents": p.contents}, ensure_ascii=False) + "\n")
    return len(digests)
