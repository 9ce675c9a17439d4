"""Reading and writing retrieval corpora in the wiki-18 / Pyserini JsonCollection layout.

One JSON object per line, either ``{"id", "contents": "\\"Title\\"\\ntext"}`` (wiki-18, Pyserini) or
``{"id", "title", "text"}`` (FlashRAG / BEIR style). Reading validates every line: malformed JSON,
missing or empty fields and duplicate ids are skipped with a ``file:line: reason`` record (or, with
``strict=True``, raise :class:`~stepsearch.errors.DataError` at the first one). Duplicate ids keep
the first occurrence: a Lucene or FAISS index with two documents under one id would be ambiguous.

:func:`iter_corpus` streams (for wiki-18-sized files); :func:`read_corpus` collects a list.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stepsearch.errors import DataError
from stepsearch.retrieval.base import Passage, split_contents


@dataclass(frozen=True)
class SkippedLine:
    """One corpus line that was not used, with the reason (``str()`` gives ``file:line: reason``)."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class CorpusReadResult:
    """Passages read from a corpus file, plus the lines that were skipped and why."""

    path: Path
    passages: list[Passage] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def summary(self, max_reasons: int = 3) -> str:
        """One line: how many passages were read and, if any, how many lines were skipped and why."""
        text = f"{len(self.passages)} passages from {self.path}"
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:max_reasons])
            more = f" (+{len(self.skipped) - max_reasons} more)" if len(self.skipped) > max_reasons else ""
            text += f"; skipped {len(self.skipped)} line(s): {shown}{more}"
        return text


def _field_str(record: Mapping, name: str) -> str | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "id":
        return str(value)  # numeric ids (e.g. DPR's) are fine; we keep them as strings
    return value if isinstance(value, str) else None


def parse_corpus_record(record: object) -> Passage:
    """Turn one decoded JSON line into a :class:`Passage`; raise ``ValueError`` with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    doc_id = _field_str(record, "id")
    if doc_id is None or not doc_id.strip():
        raise ValueError('missing or empty "id" field')
    if "contents" in record:
        contents = _field_str(record, "contents")
        if contents is None:
            raise ValueError('"contents" is not a string')
        title, text = split_contents(contents)
    elif "text" in record:
        text = _field_str(record, "text")
        title = _field_str(record, "title") if "title" in record else ""
        if text is None or title is None:
            raise ValueError('"title" and "text" must be strings')
        title, text = title.strip(), text.strip()
    else:
        raise ValueError('missing field: need "contents" (wiki-18 layout) or "text" (with optional "title")')
    if not text and not title:
        raise ValueError("empty passage (no title and no text)")
    return Passage(id=doc_id.strip(), title=title, text=text)


def iter_corpus(
    path: str | Path,
    strict: bool = False,
    skipped: list[SkippedLine] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Passage]:
    """Yield the valid passages of a JSONL corpus in file order.

    Bad lines are appended to ``skipped`` (or raise :class:`DataError` when ``strict``); blank lines
    are ignored silently. ``progress(n_bytes)`` is called after each line, for progress bars.
    Raises :class:`DataError` if the file is missing, is a directory, or holds no valid passage.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus file not found: {path}")
    if path.is_dir():
        raise DataError(f"corpus must be a JSONL file, got a directory: {path}")
    skipped = [] if skipped is None else skipped
    seen_ids: set[str] = set()
    count = 0
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if progress is not None:
                progress(len(raw))
            if not raw.strip():
                continue
            try:
                passage = parse_corpus_record(json.loads(raw.decode("utf-8")))
                if passage.id in seen_ids:
                    raise ValueError(f'duplicate id "{passage.id}" (first occurrence kept)')
            except UnicodeDecodeError:
                reason = "not valid UTF-8"
            except json.JSONDecodeError as err:
                reason = f"malformed JSON ({err.msg} at column {err.colno})"
            except ValueError as err:
                reason = str(err)
            else:
                seen_ids.add(passage.id)
                count += 1
                yield passage
                continue
            bad = SkippedLine(str(path), line_no, reason)
            if strict:
                raise DataError(f"{bad} (drop --strict to skip bad lines)")
            skipped.append(bad)
    if count == 0:
        detail = f"; first problem: {skipped[0]}" if skipped else ""
        raise DataError(f"corpus has no valid passages: {path}{detail}")


def read_corpus(path: str | Path, strict: bool = False) -> CorpusReadResult:
    """Read a whole JSONL corpus (see :func:`iter_corpus` for the rules)."""
    result = CorpusReadResult(path=Path(path))
    result.passages = list(iter_corpus(path, strict=strict, skipped=result.skipped))
    return result


def _as_passage(record: object) -> Passage:
    if isinstance(record, Passage):
        return record
    if isinstance(record, Mapping):
        return parse_corpus_record(dict(record))
    return Passage(id=str(record.id), title=str(record.title or ""), text=str(record.text))


def write_corpus(passages: Iterable, path: str | Path) -> int:
    """Write passages (``Passage``, objects with id/title/text, or dicts) as wiki-18 JSONL.

    Each line is ``{"id", "contents": "\\"Title\\"\\ntext"}``. Returns the number written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in passages:
            passage = _as_passage(record)
            handle.write(json.dumps({"id": passage.id, "contents": passage.contents}, ensure_ascii=False) + "\n")
            count += 1
    return count
