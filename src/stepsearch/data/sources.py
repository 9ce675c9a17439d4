"""Reading QA files into :class:`Example` s: one entry point for every format users have.

``read_examples(path_or_name)`` reads a local JSON/JSONL/Parquet file (or glob, or directory) or a
Hugging Face hub dataset name (see :mod:`stepsearch.data.rows` for how, and why local JSON is
parsed without ``load_dataset("json")``), detects the format from the rows' fields (overridable
with ``format=``), and converts each row. A row that cannot become an example (missing field,
wrong type, unresolvable ``#k``, supporting index out of range, no answer) is skipped and recorded
as a :class:`Skip` with ``file:line`` and the reason, or raises :class:`DataError` under
``strict=True``. Nothing is dropped without a record.

Formats (``FORMATS``): ``stepsearch`` (ours: one ``Example.to_dict()`` per line), ``hotpotqa``,
``musique``, ``2wiki`` (official layouts), ``flashrag`` (``id``, ``question``, ``golden_answers``:
Bamboogle, NQ, TriviaQA, PopQA), ``stepsearch_release`` and ``searchr1_parquet`` (see
:mod:`stepsearch.data.formats`). ``Example.dataset`` is inferred from the format, the row
(``data_source``, ``dataset``) or the file name, and can be forced with ``dataset=``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stepsearch.data import formats, official
from stepsearch.data.fields import INVALID_JSON, NOT_OBJECT, RowError
from stepsearch.data.official import ParseContext, Parsed, canonical_dataset, dataset_from_filename
from stepsearch.data.rows import RawRow, iter_rows
from stepsearch.data.schema import Example
from stepsearch.errors import DataError
from stepsearch.retrieval.base import Passage

PARSERS: dict[str, Callable[[dict, ParseContext], Parsed]] = {
    "stepsearch": official.parse_stepsearch,
    "hotpotqa": official.parse_hotpotqa,
    "musique": official.parse_musique,
    "2wiki": official.parse_2wiki,
    "flashrag": official.parse_flashrag,
    "stepsearch_release": formats.parse_release,
    "searchr1_parquet": formats.parse_searchr1,
}
FORMATS = tuple(PARSERS)

# The dataset (and passage-id prefix) a format implies, when it implies one.
FORMAT_DATASET = {"hotpotqa": "hotpotqa", "musique": "musique", "2wiki": "2wikimultihopqa"}
DUPLICATE_ID = "duplicate id"
_DETECT_ROWS = 50


@dataclass
class Skip:
    """A row that did not become an example: where it is and why."""

    source: str
    line: int
    reason: str
    kind: str = ""
    row: int | None = None

    @property
    def where(self) -> str:
        """``file:line``, plus the row number when the line does not identify the row (JSON arrays)."""
        where = f"{self.source}:{self.line}"
        if self.row is not None and self.row != self.line - 1:
            where += f" (row {self.row})"
        return where

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ReadResult:
    """Examples read from one source, the rows skipped, and the context paragraphs of the kept rows
    (MuSiQue/HotpotQA/2Wiki carry them; unique by id, first-seen order) for the retrieval corpus."""

    examples: list[Example]
    skipped: list[Skip]
    format: str
    source: str
    rows: int = 0
    passages: list[Passage] = field(default_factory=list)

    def skip_counts(self) -> Counter:
        """Skipped rows per reason kind."""
        return Counter(s.kind or s.reason for s in self.skipped)


def detect_format(row: dict) -> str | None:
    """The format a row's fields say it is, or ``None``."""
    keys = set(row)
    if "reward_model" in keys and keys & {"prompt", "extra_info"}:
        return "searchr1_parquet"
    if keys & {"sub_searchs", "sub_support_docs", "final_answer"}:
        return "stepsearch_release"
    if "question_decomposition" in keys or {"paragraphs", "answerable"} <= keys:
        return "musique"
    if "evidences" in keys:
        return "2wiki"
    if {"supporting_facts", "context"} <= keys:
        return "hotpotqa"
    if "golden_answers" in keys:
        return "flashrag"
    if {"question", "answers"} <= keys:
        return "stepsearch"
    return None


def _check_format(format: str | None) -> None:
    if format is not None and format not in PARSERS:
        raise DataError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")


def _detect(buffer: list[RawRow], source: str) -> str:
    for raw in buffer:
        if isinstance(raw.data, dict):
            found = detect_format(raw.data)
            if found:
                return found
    first = next((r.data for r in buffer if isinstance(r.data, dict)), None)
    seen = f"fields seen: {', '.join(sorted(first)[:12])}" if first else "no JSON object rows"
    raise DataError(f"{source}: cannot tell the format ({seen}); known formats: {', '.join(FORMATS)}. Pass format= (--from/--format) to choose one.")


def read_examples(
    path_or_name: str | Path,
    format: str | None = None,
    split: str | None = None,
    strict: bool = False,
    dataset: str | None = None,
    limit: int | None = None,
) -> ReadResult:
    """Read QA examples from a local file or a hub dataset; see the module docstring.

    ``limit`` stops after that many examples. Raises :class:`DataError` for an unreadable source,
    an unknown or undetectable format, any bad row under ``strict``, or when no row is usable.
    """
    _check_format(format)
    source = str(path_or_name)
    rows = iter_rows(source, split)
    buffer = list(itertools.islice(rows, _DETECT_ROWS))
    fmt = format or _detect(buffer, source)
    parse = PARSERS[fmt]
    file_dataset = dataset_from_filename(source)
    default_dataset = canonical_dataset(dataset) if dataset else FORMAT_DATASET.get(fmt) or file_dataset or Path(source).stem
    prefix = FORMAT_DATASET.get(fmt, "")
    examples: list[Example] = []
    skipped: list[Skip] = []
    passages: dict[str, Passage] = {}
    seen_ids: set[str] = set()
    n_rows = 0
    for raw in itertools.chain(buffer, rows):
        if limit is not None and len(examples) >= limit:
            break
        n_rows += 1
        try:
            if raw.error is not None:
                raise RowError(INVALID_JSON, raw.error)
            if not isinstance(raw.data, dict):
                raise RowError(NOT_OBJECT, f"row should be a JSON object, got {type(raw.data).__name__}")
            ctx = ParseContext(default_dataset, f"{Path(raw.source).stem}-{raw.index}", prefix)
            example, row_passages = parse(raw.data, ctx)
            if example.id in seen_ids:
                raise RowError(DUPLICATE_ID, f"duplicate id {example.id!r} (an earlier row has it)")
        except RowError as err:
            skip = Skip(raw.source, raw.line, err.reason, err.kind, raw.index)
            if strict:
                raise DataError(f"{skip} (strict mode: fix the row, or drop --strict to skip bad rows)") from None
            skipped.append(skip)
            continue
        if dataset:
            example.dataset = default_dataset
        seen_ids.add(example.id)
        examples.append(example)
        for p in row_passages:
            known = passages.setdefault(p.id, p)
            if (known.title, known.text) != (p.title, p.text):
                raise DataError(f"{raw.source}:{raw.line}: paragraph {p.title!r} has the id {p.id!r} of another paragraph (hash collision)")
    if n_rows and not examples:
        raise DataError(
            f"{source}: none of {n_rows} rows could be read as format {fmt!r} (first: {skipped[0]}); "
            f"known formats: {', '.join(FORMATS)}"
        )
    return ReadResult(examples, skipped, fmt, source, n_rows, list(passages.values()))


def load_examples(
    path_or_name: str | Path,
    format: str | None = None,
    split: str | None = None,
    strict: bool = False,
    dataset: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Just the examples of :func:`read_examples` (skips are logged as one warning line)."""
    result = read_examples(path_or_name, format=format, split=split, strict=strict, dataset=dataset, limit=limit)
    if result.skipped:
        import logging

        counts = ", ".join(f"{k}: {v}" for k, v in result.skip_counts().most_common())
        logging.getLogger(__name__).warning(
            "%s: skipped %d of %d rows (%s); first: %s", result.source, len(result.skipped), result.rows, counts, result.skipped[0]
        )
    return result.examples


def write_examples(
    examples: list[Example], path: str | Path, format: str = "stepsearch", split: str = "train", template: str = "think"
) -> Path:
    """Write examples in a writable format; see :func:`stepsearch.data.formats.write_examples`."""
    return formats.write_examples(examples, path, format=format, split=split, template=template)
