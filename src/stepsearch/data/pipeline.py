"""The StepSearch training-set pipeline (METHOD.md §4): from MuSiQue / HotpotQA / 2Wiki rows to
examples with per-sub-question search keys and golden passages, plus the retrieval corpus.

Steps: read the source rows (:func:`~stepsearch.data.sources.read_examples`; bad rows are skipped
with ``file:line`` and a reason, or fail under ``strict``), which yields per hop its golden
paragraph(s) by stable corpus id and unfiltered search keys (:mod:`stepsearch.data.keys`); collect
every context paragraph (distractors included) into the corpus, deduplicated by id; optionally
keep only the keys for which a retriever returns a golden passage of their hop in the top-k (the
paper's filter; the paper filters LLM-written queries, ours are derived from the annotations).

Departure from the paper: no LLM decomposition or query generation, see :mod:`.keys`. A hop
without a golden passage (MuSiQue ``paragraph_support_idx: null``, a 2Wiki triple matched to no
paragraph) cannot be filtered: its keys are kept and counted apart. A hop whose keys are all
filtered out keeps an empty key list (the key reward averages over non-empty groups only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stepsearch.data.keys import normalize
from stepsearch.data.schema import Example
from stepsearch.data.sources import Skip, read_examples
from stepsearch.errors import DataError
from stepsearch.retrieval.base import Passage, Retriever

SOURCES = {"musique": "musique", "hotpotqa": "hotpotqa", "2wiki": "2wiki"}

Progress = Callable[[int, int], None]


@dataclass
class BuildSummary:
    """Counts of one build, for the summary table."""

    source: str
    input: str
    rows: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    sub_questions: int = 0
    sub_questions_with_golden: int = 0
    keys_generated: int = 0
    filtered: bool = False
    filter_k: int = 0
    keys_checked: int = 0
    keys_kept: int = 0
    keys_unfilterable: int = 0
    sub_questions_without_keys: int = 0
    corpus_passages: int = 0

    @property
    def kept_ratio(self) -> float:
        """Kept / checked keys (1.0 when nothing was filtered)."""
        return self.keys_kept / self.keys_checked if self.filtered and self.keys_checked else 1.0

    def table_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("source", f"{self.source}: {Path(self.input).name}"),
            ("rows read", str(self.rows)),
            ("examples", str(self.examples)),
            ("rows skipped", str(sum(self.skipped.values()))),
        ]
        rows += [(f"  skipped: {kind}", str(n)) for kind, n in self.skipped.most_common()]
        rows += [
            ("sub-questions", str(self.sub_questions)),
            ("  with golden passage", str(self.sub_questions_with_golden)),
            ("search keys generated", str(self.keys_generated)),
        ]
        if self.filtered:
            rows += [
                (f"keys checked (retrieval top-{self.filter_k})", str(self.keys_checked)),
                ("keys kept", f"{self.keys_kept} ({self.kept_ratio:.1%})"),
                ("keys unfilterable (no golden)", str(self.keys_unfilterable)),
            ]
        rows += [
            ("sub-questions left without keys", str(self.sub_questions_without_keys)),
            ("corpus passages", str(self.corpus_passages)),
        ]
        return rows


@dataclass
class PipelineResult:
    """The built examples, the corpus passages (unique ids), the summary and the skipped rows."""

    examples: list[Example]
    passages: list[Passage]
    summary: BuildSummary
    skipped: list[Skip]


@dataclass
class FilterStats:
    checked: int = 0
    kept: int = 0
    unfilterable: int = 0


def _hits_golden(results: list[Passage], golden_ids: set[str], golden_texts: set[str]) -> bool:
    # Ids match when the index was built from our corpus; the text test covers foreign indexes.
    return any(p.id in golden_ids or normalize(p.text) in golden_texts for p in results)


def filter_search_keys(
    examples: list[Example], retriever: Retriever, k: int = 3, batch_size: int = 256, progress: Progress | None = None
) -> FilterStats:
    """Keep, in place, each hop's keys whose top-``k`` results contain a golden passage of that hop.

    Hops without golden passages keep their keys (counted as unfilterable). Each distinct key
    text is searched once. ``progress(done, total)`` is called after each batch.
    """
    stats = FilterStats()
    queries: dict[str, list[Passage]] = {}
    for ex in examples:
        for sq in ex.sub_questions:
            if sq.golden:
                for key in sq.search_keys:
                    queries.setdefault(key, [])
            else:
                stats.unfilterable += len(sq.search_keys)
    pending = list(queries)
    total = len(pending)
    for start in range(0, total, batch_size):
        batch = pending[start : start + batch_size]
        for query, results in zip(batch, retriever.search(batch, k)):
            queries[query] = results[:k]
        if progress:
            progress(min(start + batch_size, total), total)
    for ex in examples:
        for sq in ex.sub_questions:
            if not sq.golden:
                continue
            ids = {g.id for g in sq.golden}
            texts = {normalize(g.text) for g in sq.golden}
            kept = [key for key in sq.search_keys if _hits_golden(queries[key], ids, texts)]
            stats.checked += len(sq.search_keys)
            stats.kept += len(kept)
            sq.search_keys = kept
    return stats


def build_training_set(
    source: str,
    input_path: str | Path,
    *,
    strict: bool = False,
    limit: int | None = None,
    retriever: Retriever | None = None,
    filter_k: int = 3,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> PipelineResult:
    """Read ``input_path`` as ``source`` (musique | hotpotqa | 2wiki) into training examples and the
    corpus passages; with a ``retriever``, filter the keys by top-``filter_k`` golden hits."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    read = read_examples(input_path, format=SOURCES[source], strict=strict, limit=limit)
    summary = BuildSummary(source=source, input=str(input_path), rows=read.rows, examples=len(read.examples))
    summary.skipped = read.skip_counts()
    summary.corpus_passages = len(read.passages)
    for ex in read.examples:
        summary.sub_questions += ex.num_hops
        summary.sub_questions_with_golden += sum(1 for sq in ex.sub_questions if sq.golden)
        summary.keys_generated += sum(len(sq.search_keys) for sq in ex.sub_questions)
    if retriever is not None:
        stats = filter_search_keys(read.examples, retriever, k=filter_k, batch_size=batch_size, progress=progress)
        summary.filtered, summary.filter_k = True, filter_k
        summary.keys_checked, summary.keys_kept, summary.keys_unfilterable = stats.checked, stats.kept, stats.unfilterable
    summary.sub_questions_without_keys = sum(1 for ex in read.examples for sq in ex.sub_questions if not sq.search_keys)
    return PipelineResult(read.examples, read.passages, summary, read.skipped)
