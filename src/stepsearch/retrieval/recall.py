"""Recall of golden paragraphs: how often a retriever finds the passages a question needs.

Golden paragraphs in the official raw files (MuSiQue ``paragraphs`` + ``paragraph_support_idx``,
HotpotQA ``context`` + ``supporting_facts``) are given as (title, text), not corpus ids, so
:class:`PassageLookup` maps a whitespace-normalised (title, text) to the corpus id.

MuSiQue sub-questions are made searchable the way the StepSearch data pipeline writes search
keys: ``#n`` becomes the answer of sub-question ``n`` and the ``>>`` of composed triples becomes a
space (``"#1 >> capital"`` → ``"Mountrail County capital"``).

recall@k for one question = |golden ∩ top-k ids| / |golden|; we report the mean over questions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stepsearch.retrieval.base import Passage, Retriever


def _norm(text: str) -> str:
    return " ".join(text.split())


class PassageLookup:
    """Find corpus ids from (title, text) as the raw QA files give paragraphs."""

    def __init__(self, passages: Iterable[Passage]) -> None:
        self._by_content: dict[tuple[str, str], str] = {}
        for passage in passages:
            self._by_content.setdefault((_norm(passage.title), _norm(passage.text)), passage.id)

    def find(self, title: str, text: str) -> str | None:
        return self._by_content.get((_norm(title), _norm(text)))


@dataclass(frozen=True)
class RecallQuery:
    """A query and the corpus ids of the paragraphs it should retrieve."""

    query: str
    golden_ids: frozenset[str]
    source: str


_HOP_REF = re.compile(r"#(\d+)")


def musique_subquestion_queries(rows: Iterable[dict], lookup: PassageLookup) -> list[RecallQuery]:
    """One query per MuSiQue sub-question whose supporting paragraph is in the corpus."""
    queries = []
    for row in rows:
        answers = [step.get("answer", "") for step in row.get("question_decomposition", [])]
        paragraphs = row.get("paragraphs", [])
        for step in row.get("question_decomposition", []):
            text = _HOP_REF.sub(lambda m: answers[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(answers) else "",
                                step["question"])
            text = _norm(text.replace(">>", " "))
            support = step.get("paragraph_support_idx")
            if not text or support is None or not 0 <= support < len(paragraphs):
                continue
            golden = lookup.find(paragraphs[support]["title"], paragraphs[support]["paragraph_text"])
            if golden is not None:
                queries.append(RecallQuery(text, frozenset({golden}), "musique-subq"))
    return queries


def hotpot_question_queries(rows: Iterable[dict], lookup: PassageLookup) -> list[RecallQuery]:
    """One query per HotpotQA question; golden = the paragraphs of its supporting-fact titles."""
    queries = []
    for row in rows:
        support_titles = {title for title, _ in row.get("supporting_facts", [])}
        golden = {
            lookup.find(title, "".join(sentences))
            for title, sentences in row.get("context", [])
            if title in support_titles
        }
        golden.discard(None)
        if golden:
            queries.append(RecallQuery(row["question"], frozenset(golden), "hotpotqa"))
    return queries


def load_raw_rows(path: str | Path) -> list[dict]:
    """Rows of a raw QA file: a JSON array or JSON lines."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def recall_at_k(
    retriever: Retriever, queries: Sequence[RecallQuery], ks: Sequence[int] = (3, 10), batch_size: int = 256
) -> dict[int, float]:
    """Mean recall@k of golden ids over ``queries`` for each k (one search at max(ks))."""
    if not queries:
        return {k: float("nan") for k in ks}
    totals = {k: 0.0 for k in ks}
    depth = max(ks)
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        results = retriever.search([q.query for q in batch], depth)
        for query, hits in zip(batch, results):
            ids = [hit.id for hit in hits]
            for k in ks:
                totals[k] += len(query.golden_ids.intersection(ids[:k])) / len(query.golden_ids)
    return {k: totals[k] / len(queries) for k in ks}
