"""Retrieval-corpus passages: stable ids, and reading/writing the wiki-18 layout.

Passage ids are ``{prefix}-{md5(title + "\\n" + text)[:12]}`` with the prefix the canonical source
dataset name (``musique``, ``hotpotqa``, ``2wikimultihopqa``...). The id depends only on the
paragraph's content, so the same paragraph read from two files (train and dev, or two runs) gets
the same id, and the golden passages of an example can be written without a lookup table. This is
exactly the scheme of the shared corpus ``multihop_passages.jsonl``: ids built here from the raw
HotpotQA/MuSiQue/2Wiki files equal the ids there. The prefix keeps the three sources apart (their
paragraph texts come from different Wikipedia dumps); 48 bits of md5 make a collision among
millions of paragraphs improbable (~1e-3 at 20M).

File layout (Pyserini JsonCollection / wiki-18): one ``{"id", "contents": "\\"Title\\"\\ntext"}``
per line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from stepsearch.errors import DataError
from stepsearch.retrieval.base import Passage, split_contents


def passage_id(prefix: str, title: str, text: str) -> str:
    """The stable corpus id of a paragraph (see the module docstring)."""
    digest = hashlib.md5(f"{title}\n{text}".encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}" if prefix else digest


def make_passage(prefix: str, title: str, text: str) -> Passage:
    """A corpus passage with whitespace trimmed and its stable id (so it round-trips verbatim)."""
    title, text = title.strip(), text.strip()
    return Passage(id=passage_id(prefix, title, text), title=title, text=text)


def contents(title: str, text: str) -> str:
    """wiki-18 ``contents``: ``"Title"\\ntext``."""
    return f'"{title}"\n{text}'


def write_corpus(passages: Iterable[Passage], path: str | Path) -> int:
    """Write passages as wiki-18 JSONL, deduplicated by id, first occurrence kept. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with path.open("w", encoding="utf-8") as f:
        for p in passages:
            if p.id in seen:
                continue
            seen.add(p.id)
            f.write(json.dumps({"id": p.id, "contents": contents(p.title, p.text)}, ensure_ascii=False) + "\n")
    return len(seen)


def read_corpus(path: str | Path) -> dict[str, Passage]:
    """Read a wiki-18 JSONL corpus into ``{id: Passage}`` (a ``title``/``text`` pair is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found")
    out: dict[str, Passage] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pid = str(row["id"])
                if "contents" in row:
                    title, text = split_contents(row["contents"])
                else:
                    title, text = row.get("title", ""), row["text"]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise DataError(f"{path}:{line_no}: not a corpus row with id and contents ({err})") from None
            out[pid] = Passage(id=pid, title=title, text=text)
    return out
