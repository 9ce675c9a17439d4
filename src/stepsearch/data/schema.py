"""The one example type every reader produces and every consumer (rollout, rewards) reads.

An :class:`Example` is a question with its gold answers (answer first, then aliases) and, where
known, its decomposition into :class:`SubQuestion` s: each with the alternative search keys
(``K_j`` of METHOD.md §2c) and golden passages (``G`` of §2e) identified by corpus id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GoldenPassage:
    """A supporting paragraph, verbatim as it stands in the retrieval corpus."""

    id: str
    title: str
    text: str


@dataclass
class SubQuestion:
    """One hop: its question, its answer, alternative search queries, and golden passages."""

    question: str
    answer: str = ""
    search_keys: list[str] = field(default_factory=list)
    golden: list[GoldenPassage] = field(default_factory=list)


@dataclass
class Example:
    """A QA example. ``answers[0]`` is the gold answer, the rest are accepted aliases."""

    id: str
    question: str
    answers: list[str]
    dataset: str = ""
    sub_questions: list[SubQuestion] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def search_keys(self) -> list[list[str]]:
        """K = {K_1..K_m}: per sub-question, its alternative phrasings (empty groups dropped)."""
        return [sq.search_keys for sq in self.sub_questions if sq.search_keys]

    @property
    def golden_passages(self) -> list[GoldenPassage]:
        """G = {g_1..g_n}: golden paragraphs of all hops, deduplicated by id, in hop order."""
        seen: set[str] = set()
        out: list[GoldenPassage] = []
        for sq in self.sub_questions:
            for g in sq.golden:
                if g.id not in seen:
                    seen.add(g.id)
                    out.append(g)
        return out

    @property
    def num_hops(self) -> int:
        return len(self.sub_questions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "Example":
        subs = [
            SubQuestion(
                question=s["question"],
                answer=s.get("answer", ""),
                search_keys=list(s.get("search_keys", [])),
                golden=[GoldenPassage(**g) for g in s.get("golden", [])],
            )
            for s in row.get("sub_questions", []) or []
        ]
        return cls(
            id=str(row["id"]),
            question=row["question"],
            answers=list(row["answers"]),
            dataset=row.get("dataset", ""),
            sub_questions=subs,
            metadata=dict(row.get("metadata", {}) or {}),
        )
