"""The retriever protocol: the environment the policy searches in.

Every retriever (Pyserini BM25, dense FAISS, remote HTTP, cached) takes a batch of queries and
returns, per query, up to ``k`` :class:`Passage` objects best first. The rollout engine and the
data pipeline see only this protocol, so backends are interchangeable by config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable
from stepsearch.errors import RetrievalError


@dataclass(frozen=True)
class Passage:
    """One retrieved passage. ``text`` is the body without the title; ``score`` is the retriever's."""

    id: str
    title: str
    text: str
    score: float = 0.0

    @property
    def contents(self) -> str:
        """The wiki-18 / Pyserini ``contents`` form: ``"Title"\\ntext``."""
        return f'"{self.title}"\n{self.text}'

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Retriever(Protocol):
    """``search(queries, k)`` → one list of at most ``k`` passages per query, in input order."""

    def search(self, queries: list[str], k: int) -> list[list[Passage]]: ...


def split_contents(contents: str) -> tuple[str, str]:
    """Split wiki-18 ``contents`` (``"Title"\\ntext``) into (title, text).

    Without a quoted first line the title is empty and the whole string is the text.
    """
    first, sep, rest = contents.partition("\n")
    first = first.strip()
    if sep and len(first) >= 2 and first[0] == '"' and first[-1] == '"':
        return first[1:-1], rest.strip()
    return "", contents.strip()


def check_search_args(queries: list[str], k: int) -> None:
    """Validate a ``search`` call the same way for every backend.

    Raises :class:`~stepsearch.errors.RetrievalError` naming the problem: ``k`` must be a positive
    integer, ``queries`` a list of strings, and no query may be empty (the message gives its
    position in the batch, so a caller can find it).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise RetrievalError(f"k must be a positive integer (number of passages per query), got {k!r}")
    if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
        raise RetrievalError(f"queries must be a list of strings, got {type(queries).__name__}")
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise RetrievalError(f"query at position {position} is {type(query).__name__}, not a string")
        if not query.strip():
            raise RetrievalError(f"query at position {position} is empty: give a non-empty search string")
