"""Row parsers for the official dataset layouts (MuSiQue, HotpotQA, 2WikiMultiHopQA), the FlashRAG
layout and our own JSONL: one raw row → one :class:`Example` plus the row's context paragraphs.

Golden passages carry the stable corpus ids of :mod:`stepsearch.data.corpus`, so they match the
corpus that ``data build`` writes from the same rows (and the shared ``multihop_passages.jsonl``).
Paragraph text: MuSiQue's ``paragraph_text`` as is; HotpotQA's sentences concatenated (they carry
their own leading spaces); 2Wiki's sentences joined by one space. Search keys are generated here
(unfiltered) by :mod:`stepsearch.data.keys`; the pipeline filters them by retrieval.

Sub-questions where the source has no decomposition:
- HotpotQA: one hop per supporting paragraph. For a bridge question the paragraph that mentions
  the other's title comes first, its answer is the bridge entity (the other title) when its text
  names it in full, and the last hop's answer is the final answer; other hops (comparison
  questions, unnamed bridges) have no answer of their own ("").
- 2Wiki: one hop per evidence triple (subject, relation, object): "What is the {relation} of
  {subject}?", answer = object, golden = the supporting paragraph whose title best matches the
  subject (token F1; else the one that mentions the subject; else the one containing the object).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stepsearch.data.corpus import make_passage
from stepsearch.data.fields import (
    MISSING,
    OUT_OF_RANGE,
    UNANSWERABLE,
    UNRESOLVABLE,
    WRONG_TYPE,
    RowError,
    answer_list,
    at,
    get,
    get_dict,
    get_list,
    get_str,
    str_list,
)
from stepsearch.data.keys import (
    dedup_keys,
    hotpot_hop_keys,
    mention_score,
    musique_keys,
    normalize,
    relation_keys,
    resolve_references,
    strip_parenthetical,
    token_f1,
)
from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.retrieval.base import Passage


@dataclass
class ParseContext:
    """What a parser needs besides the row: the dataset name, an id for rows that have none, and
    the passage-id prefix (the source's canonical name, so a renamed dataset keeps corpus ids)."""

    dataset: str
    fallback_id: str
    id_prefix: str = ""

    @property
    def prefix(self) -> str:
        return self.id_prefix or self.dataset


Parsed = tuple[Example, list[Passage]]

# Canonical dataset names (Search-R1 / FlashRAG spelling), keyed by the spellings files use.
DATASET_ALIASES = {
    "musique": "musique", "musi": "musique",
    "hotpotqa": "hotpotqa", "hotpot": "hotpotqa", "hotpot_qa": "hotpotqa",
    "2wikimultihopqa": "2wikimultihopqa", "2wiki": "2wikimultihopqa", "wikimultihopqa": "2wikimultihopqa",
    "bamboogle": "bamboogle", "nq": "nq", "triviaqa": "triviaqa", "tqa": "triviaqa", "popqa": "popqa",
}


def canonical_dataset(name: str) -> str:
    """``"musi"`` → ``"musique"``, ``"hotpot"`` → ``"hotpotqa"``; unknown names are kept as given."""
    return DATASET_ALIASES.get(name.strip().lower(), name.strip())


def dataset_from_filename(path: str) -> str | None:
    """The dataset a file name mentions (``nq_test_sample.jsonl`` → ``nq``), or ``None``."""
    stem = re.split(r"[\\/]", path)[-1].lower()
    for token in re.split(r"[^a-z0-9]+", stem):
        if token in DATASET_ALIASES:
            return DATASET_ALIASES[token]
    for alias in sorted(DATASET_ALIASES, key=len, reverse=True):
        if len(alias) > 4 and alias in stem:
            return DATASET_ALIASES[alias]
    return None


def golden_of(p: Passage) -> GoldenPassage:
    return GoldenPassage(id=p.id, title=p.title, text=p.text)


# --------------------------------------------------------------------------- MuSiQue


def parse_musique(row: dict, ctx: ParseContext) -> Parsed:
    ex_id = get_str(row, "id", default=ctx.fallback_id)
    question = get_str(row, "question")
    if row.get("answerable") is False:
        raise RowError(UNANSWERABLE, "answerable is false (a MuSiQue-Full contrast question without support)")
    answers = answer_list(get(row, "answer"), row.get("answer_aliases"), "answer")
    passages, by_idx = [], {}
    for i, para in enumerate(get_list(row, "paragraphs")):
        with at(f"paragraphs[{i}]"):
            if not isinstance(para, dict):
                raise RowError(WRONG_TYPE, f"paragraphs[{i}] should be an object, got {type(para).__name__}")
            p = make_passage(ctx.prefix, get_str(para, "title", allow_empty=True), get_str(para, "paragraph_text"))
        idx = para.get("idx", i)
        by_idx[idx if isinstance(idx, int) else i] = p
        passages.append(p)
    steps = get_list(row, "question_decomposition")
    if not steps:
        raise RowError(MISSING, "field 'question_decomposition' is empty")
    subs: list[SubQuestion] = []
    templates: list[str] = []
    for j, step in enumerate(steps):
        with at(f"question_decomposition[{j}]"):
            if not isinstance(step, dict):
                raise RowError(WRONG_TYPE, f"question_decomposition[{j}] should be an object")
            template = get_str(step, "question")
            sub_answer = get_str(step, "answer")
            try:
                resolved = resolve_references(template, [s.answer for s in subs])
            except ValueError as err:
                raise RowError(UNRESOLVABLE, f"question_decomposition[{j}].question {template!r}: {err}") from None
            support = step.get("paragraph_support_idx")
            golden: list[GoldenPassage] = []
            if support is not None:
                if not isinstance(support, int) or isinstance(support, bool):
                    raise RowError(WRONG_TYPE, f"field 'paragraph_support_idx' should be an integer, got {type(support).__name__}")
                if support not in by_idx:
                    raise RowError(OUT_OF_RANGE, f"question_decomposition[{j}].paragraph_support_idx={support} names no paragraph ({len(passages)} paragraphs)")
                golden = [golden_of(by_idx[support])]
        keys = musique_keys(resolved, [g.title for g in golden], answer=sub_answer)
        subs.append(SubQuestion(question=resolved, answer=sub_answer.strip(), search_keys=keys, golden=golden))
        templates.append(template)
    example = Example(ex_id, question, answers, ctx.dataset, subs, {"decomposition": templates})
    return example, passages


# --------------------------------------------------------------------------- HotpotQA / 2Wiki context


def _context(row: dict, joiner: str, prefix: str) -> dict[str, tuple[Passage, list[str]]]:
    """``context`` → {title: (passage, sentences)}. Accepts the official ``[[title, [sents]]]`` and
    the hub ``{"title": [...], "sentences": [[...]]}`` layouts."""
    raw = get(row, "context")
    if isinstance(raw, dict):
        titles, sentences = str_list(get(raw, "title"), "context.title"), get_list(raw, "sentences")
        if len(titles) != len(sentences):
            raise RowError(WRONG_TYPE, "context.title and context.sentences differ in length")
        raw = [[t, s] for t, s in zip(titles, sentences)]
    if not isinstance(raw, list):
        raise RowError(WRONG_TYPE, f"field 'context' should be a list, got {type(raw).__name__}")
    out: dict[str, tuple[Passage, list[str]]] = {}
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise RowError(WRONG_TYPE, f"context[{i}] should be [title, [sentences]]")
        sentences = str_list(item[1], f"context[{i}][1]")
        text = "".join(sentences) if joiner == "" else joiner.join(s.strip() for s in sentences)
        if item[0] not in out:
            out[item[0]] = (make_passage(prefix, item[0], text), sentences)
    return out


def _supporting(row: dict, context: dict[str, tuple[Passage, list[str]]]) -> dict[str, list[str]]:
    """``supporting_facts`` → {title: supporting sentences}, in order of first mention."""
    raw = get(row, "supporting_facts")
    if isinstance(raw, dict):
        raw = [[t, s] for t, s in zip(get_list(raw, "title"), get_list(raw, "sent_id"))]
    if not isinstance(raw, list) or not raw:
        raise RowError(MISSING, "field 'supporting_facts' is empty or not a list")
    out: dict[str, list[str]] = {}
    for i, fact in enumerate(raw):
        if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str) and isinstance(fact[1], int)):
            raise RowError(WRONG_TYPE, f"supporting_facts[{i}] should be [title, sentence index]")
        title, k = fact
        if title not in context:
            raise RowError(OUT_OF_RANGE, f"supporting_facts[{i}]: title {title!r} is not in the context")
        sentences = context[title][1]
        if not 0 <= k < len(sentences):
            raise RowError(OUT_OF_RANGE, f"supporting_facts[{i}]: sentence {k} of {title!r} out of range ({len(sentences)} sentences)")
        out.setdefault(title, []).append(sentences[k])
    return out


def _example_id(row: dict, ctx: ParseContext) -> str:
    return get_str(row, "_id" if "_id" in row else "id", default=ctx.fallback_id)


def _title_hops(question: str, final: str, kind: str, supporting: dict[str, list[str]], context) -> list[SubQuestion]:
    """HotpotQA-style hops: one per supporting paragraph (see the module docstring)."""
    titles = list(supporting)
    bridge = kind == "bridge"
    if bridge and len(titles) == 2:
        a, b = titles
        text_a, text_b = context[a][0].text, context[b][0].text
        if mention_score(a, text_b) > mention_score(b, text_a):
            titles = [b, a]  # the paragraph mentioning the other's title is the first hop
    subs = []
    for i, title in enumerate(titles):
        last = i == len(titles) - 1
        answer = ""
        if bridge and last:
            answer = final
        elif bridge and mention_score(titles[i + 1], context[title][0].text) == 1.0:
            answer = strip_parenthetical(titles[i + 1])  # the bridge entity, named in this paragraph
        support_text = " ".join(supporting[title])
        keys = hotpot_hop_keys(question, title, support_text, first_bridge_hop=bridge and i == 0, answer=answer)
        subs.append(SubQuestion(question=keys[0] if keys else title, answer=answer, search_keys=keys, golden=[golden_of(context[title][0])]))
    return subs


def parse_hotpotqa(row: dict, ctx: ParseContext) -> Parsed:
    ex_id = _example_id(row, ctx)
    question = get_str(row, "question")
    answers = answer_list(get(row, "answer"), None, "answer")
    context = _context(row, "", ctx.prefix)
    supporting = _supporting(row, context)
    kind = row.get("type") if isinstance(row.get("type"), str) else ""
    subs = _title_hops(question, answers[0], kind, supporting, context)
    meta = {k: row[k] for k in ("type", "level") if isinstance(row.get(k), str)}
    return Example(ex_id, question, answers, ctx.dataset, subs, meta), [p for p, _ in context.values()]


# --------------------------------------------------------------------------- 2WikiMultiHopQA


def _clean_entity(text: str) -> str:
    text = text.strip()
    if text.count('"') % 2 == 1:  # a stray quote from the dataset's extraction: '"Limehouse Blues'
        text = text.replace('"', "")
    return text.strip()


def _match_paragraph(subject: str, obj: str, supporting: dict[str, list[str]], context) -> str | None:
    scores = [(max(float(normalize(t) == normalize(subject)), token_f1(strip_parenthetical(t), subject)), t) for t in supporting]
    best = max(scores, key=lambda s: s[0], default=(0.0, None))
    if best[0] > 0:
        return best[1]
    for t in supporting:
        if mention_score(subject, context[t][0].text) == 1.0:
            return t
    for t in supporting:
        if obj and normalize(obj) in normalize(" ".join(supporting[t])):
            return t
    return None


def parse_2wiki(row: dict, ctx: ParseContext) -> Parsed:
    ex_id = _example_id(row, ctx)
    question = get_str(row, "question")
    answers = answer_list(get(row, "answer"), None, "answer")
    context = _context(row, " ", ctx.prefix)
    supporting = _supporting(row, context)
    kind = row.get("type") if isinstance(row.get("type"), str) else ""
    evidences = row.get("evidences") or []
    if not isinstance(evidences, list):
        raise RowError(WRONG_TYPE, f"field 'evidences' should be a list, got {type(evidences).__name__}")
    subs: list[SubQuestion] = []
    for i, triple in enumerate(evidences):
        if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(x, str) for x in triple)):
            raise RowError(WRONG_TYPE, f"evidences[{i}] should be [subject, relation, object] strings")
        subject, relation, obj = (_clean_entity(x) for x in triple)
        title = _match_paragraph(subject, obj, supporting, context)
        golden = [golden_of(context[title][0])] if title else []
        keys = dedup_keys(relation_keys(subject, relation, [title] if title else []), forbidden=[obj])
        subs.append(SubQuestion(f"What is the {relation} of {subject}?", obj, keys, golden))
    meta: dict[str, Any] = {"type": kind} if kind else {}
    if not subs:  # no evidence triples: fall back to one hop per supporting paragraph
        subs = _title_hops(question, answers[0], "bridge" if kind in {"compositional", "inference"} else "comparison", supporting, context)
        meta["hops_from"] = "supporting_facts"
    return Example(ex_id, question, answers, ctx.dataset, subs, meta), [p for p, _ in context.values()]


# --------------------------------------------------------------------------- FlashRAG and ours


def parse_flashrag(row: dict, ctx: ParseContext) -> Parsed:
    ex_id = get_str(row, "id", default=ctx.fallback_id)
    question = get_str(row, "question")
    answers = answer_list(get(row, "golden_answers"), None, "golden_answers")
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return Example(ex_id, question, answers, ctx.dataset, [], dict(meta)), []


def parse_golden(raw: Any, field: str) -> GoldenPassage:
    if not isinstance(raw, dict):
        raise RowError(WRONG_TYPE, f"field '{field}' should be an object with id, title, text")
    with at(field):
        return GoldenPassage(id=get_str(raw, "id"), title=get_str(raw, "title", allow_empty=True), text=get_str(raw, "text"))


def parse_stepsearch(row: dict, ctx: ParseContext) -> Parsed:
    """Our JSONL: one ``Example.to_dict()`` per line, checked field by field."""
    ex_id = get_str(row, "id", default=ctx.fallback_id)
    question = get_str(row, "question")
    answers = str_list(get(row, "answers"), "answers")
    if not any(a.strip() for a in answers):
        raise RowError("answers missing", "field 'answers' holds no non-empty answer")
    subs = []
    for j, raw in enumerate(get_list(row, "sub_questions", [])):
        with at(f"sub_questions[{j}]"):
            if not isinstance(raw, dict):
                raise RowError(WRONG_TYPE, f"sub_questions[{j}] should be an object")
            keys = str_list(get_list(raw, "search_keys", []), "search_keys")
            golden = [parse_golden(g, f"golden[{k}]") for k, g in enumerate(get_list(raw, "golden", []))]
            subs.append(SubQuestion(get_str(raw, "question", allow_empty=True), get_str(raw, "answer", allow_empty=True, default=""), keys, golden))
    dataset = row.get("dataset") if isinstance(row.get("dataset"), str) and row.get("dataset") else ctx.dataset
    meta = get_dict(row, "metadata", {})
    return Example(ex_id, question, answers, dataset, subs, dict(meta)), []
