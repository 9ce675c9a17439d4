"""Field checks shared by the readers: each failure is a :class:`RowError` with a short kind (counted
in summaries) and a reason that names the field."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any


class RowError(ValueError):
    """A row that cannot become an example. ``kind`` groups reasons in summaries."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


MISSING = "missing field"
WRONG_TYPE = "wrong type"
NO_ANSWER = "answers missing"
UNRESOLVABLE = "unresolvable #k"
OUT_OF_RANGE = "supporting index out of range"
UNANSWERABLE = "unanswerable"
INVALID_JSON = "invalid JSON"
NOT_OBJECT = "not an object"


def get(row: dict, field: str, default: Any = ...) -> Any:
    """``row[field]``; a missing or null field raises (unless a default is given)."""
    value = row.get(field)
    if value is None:
        if default is ...:
            raise RowError(MISSING, f"missing field '{field}'")
        return default
    return value


def get_str(row: dict, field: str, *, allow_empty: bool = False, default: Any = ...) -> str:
    """A string field (numbers are accepted as ids: ``_id: 5`` → ``"5"``)."""
    value = get(row, field, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and field in {"id", "_id"}:
        value = str(value)
    if not isinstance(value, str):
        raise RowError(WRONG_TYPE, f"field '{field}' should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(MISSING, f"field '{field}' is empty")
    return value


def get_list(row: dict, field: str, default: Any = ...) -> list:
    value = get(row, field, default)
    if not isinstance(value, list):
        raise RowError(WRONG_TYPE, f"field '{field}' should be a list, got {type(value).__name__}")
    return value


def get_dict(row: dict, field: str, default: Any = ...) -> dict:
    value = get(row, field, default)
    if not isinstance(value, dict):
        raise RowError(WRONG_TYPE, f"field '{field}' should be an object, got {type(value).__name__}")
    return value


def str_list(value: Any, field: str) -> list[str]:
    """A list of strings (a single string counts as a one-element list)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RowError(WRONG_TYPE, f"field '{field}' should be a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise RowError(WRONG_TYPE, f"field '{field}[{i}]' should be a string, got {type(item).__name__}")
        out.append(item)
    return out


def answer_list(first: Any, aliases: Any, field: str, alias_field: str = "answer_aliases") -> list[str]:
    """Gold answer then aliases: trimmed, empty dropped, duplicates dropped, order kept.

    Raises ``RowError(NO_ANSWER)`` when nothing is left.
    """
    answers: list[str] = []
    if first is not None:
        answers += str_list(first, field) if isinstance(first, list) else [first if isinstance(first, str) else _scalar(first, field)]
    if aliases is not None:
        answers += str_list(aliases, alias_field)
    out: list[str] = []
    for a in answers:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    if not out:
        raise RowError(NO_ANSWER, f"no non-empty answer in '{field}'")
    return out


def _scalar(value: Any, field: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    raise RowError(WRONG_TYPE, f"field '{field}' should be a string, got {type(value).__name__}")


@contextmanager
def at(prefix: str):
    """Prefix field names in errors raised inside: ``field 'title'`` → ``field 'paragraphs[3].title'``."""
    try:
        yield
    except RowError as err:
        if prefix in err.reason:
            raise
        reason = err.reason.replace("field '", f"field '{prefix}.", 1) if "field '" in err.reason else f"{prefix}: {err.reason}"
        raise RowError(err.kind, reason) from None
