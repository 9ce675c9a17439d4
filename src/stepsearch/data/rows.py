"""Raw rows from a local file or a Hugging Face hub dataset, each tagged with where it came from.

How files are read, and why:

- **Parquet files and hub names** go through Hugging Face ``datasets``
  (``load_dataset("parquet", data_files=...)`` / ``load_dataset(name[, config], split=...)``): the
  file has a typed schema already, and a hub name works the same way as a local file. A row's
  position is its row number.
- **Local JSON / JSONL files** are parsed here with the standard ``json`` module instead of
  ``load_dataset("json")``. The HF loader unifies one Arrow schema over all rows, which loses
  what error reports need: a blank or broken line fails the whole file with "Expected object or
  value" and no line number, an integer field becomes a float as soon as one row has a float, a
  missing field and a ``null`` both come back as ``None``, and rows never say which line they
  started on. Reading the JSON ourselves keeps the exact types and reports ``file:line`` for
  every skipped row; a JSONL line that is not valid JSON is one bad row, not a failed file.

Content, not the extension, decides JSON array vs JSONL: a file whose first non-blank character
is ``[`` is a JSON array (HotpotQA, 2Wiki), anything else is read line by line. ``.gz`` files are
decompressed; a glob pattern reads every matching file in name order.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsearch.errors import DataError


@dataclass
class RawRow:
    """One input row: its parsed value (``None`` when ``error`` says why it could not be parsed)."""

    source: str
    line: int
    index: int
    data: Any
    error: str | None = None


def is_parquet(path: str | Path) -> bool:
    """Parquet by magic bytes (``PAR1``), whatever the extension."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def local_files(path_or_name: str) -> list[Path] | None:
    """The local files a path or glob names, or ``None`` when it names none (maybe a hub name)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".jsonl", ".parquet", ".gz"})
        if not files:
            raise DataError(f"{path}: directory holds no .json/.jsonl/.parquet files")
        return files
    if any(ch in path_or_name for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise DataError(f"{path_or_name}: the pattern matches no file")
        return files
    return None


def iter_rows(path_or_name: str, split: str | None = None) -> Iterator[RawRow]:
    """Rows of a local file (JSON, JSONL, Parquet; glob or directory) or of a hub dataset."""
    files = local_files(path_or_name)
    if files is None:
        yield from _hub_rows(path_or_name, split)
        return
    for path in files:
        if is_parquet(path):
            yield from _parquet_rows(path)
        else:
            yield from _json_rows(path)


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it a JSON/JSONL/Parquet file?") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _json_rows(path: Path) -> Iterator[RawRow]:
    text = _read_text(path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        yield from _json_array_rows(path, text)
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            yield RawRow(str(path), line_no, line_no - 1, None, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield RawRow(str(path), line_no, line_no - 1, data)


def _json_array_rows(path: Path, text: str) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, each with the line where it starts."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    index = 0

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    counted = {"pos": 0, "line": 1}  # lines counted incrementally: positions only move forward

    def line_of(i: int) -> int:
        counted["line"] += text.count("\n", counted["pos"], i)
        counted["pos"] = i
        return counted["line"]

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        try:
            data, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            # Inside an array one broken element breaks the rest: the file is unreadable.
            raise DataError(f"{path}:{err.lineno}: invalid JSON in element {index} of the array ({err.msg}, column {err.colno})") from None
        yield RawRow(str(path), line_of(pos), index, data)
        index += 1
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        raise DataError(f"{path}:{line_of(pos)}: invalid JSON after element {index - 1} of the array (expected ',' or ']')")


def _to_python(value: Any) -> Any:
    """numpy/arrow containers (from parquet) → plain lists/dicts, recursively."""
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _to_python(value.tolist())
    return value


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - arrow/datasets raise many types for a broken file
        raise DataError(f"{path}: cannot read as Parquet ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    for i, row in enumerate(ds):
        yield RawRow(str(path), i + 1, i, _to_python(row))


def _hub_rows(name: str, split: str | None) -> Iterator[RawRow]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # noqa: BLE001 - offline, missing repo, bad config: all one message
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{name}: no such local file, and loading it as a Hugging Face hub dataset failed ({first}). "
            "Give the path of a local JSON/JSONL/Parquet file, or a hub name ('owner/name' or 'owner/name:config') with network access."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(f"{name}: has splits {sorted(loaded)}; choose one with split=")
        (split, loaded), = loaded.items()
    source = f"{name}[{split or 'train'}]"
    for i, row in enumerate(loaded):
        yield RawRow(source, i + 1, i, _to_python(row))
