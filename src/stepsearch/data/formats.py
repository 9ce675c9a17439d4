"""The StepSearch release layout and the Search-R1/StepSearch parquet rows: read and written.

Release JSONL (the released ``musi_answerable_{train,dev}.jsonl``): ``question``, ``final_answer``,
``answer_aliases``, ``sub_questions``, ``sub_answers``, ``sub_searchs`` (per sub-question, its list
of alternative search queries) and ``sub_support_docs`` (golden paragraphs as ``{"title",
"paragraph_text"}``). We write the same fields and add ``id`` and ``sub_question`` (the hop index)
to each support doc, plus ``id``, ``hops``, ``dataset`` and ``metadata`` to the row; released code
reads only the fields it knows, and our reader restores the exact hop of each golden paragraph.
``sub_searchs`` stays aligned with ``sub_questions`` (a hop whose keys were all filtered out is an
empty list).

Search-R1/StepSearch parquet (what ``scripts/data_process/*_search.py`` of both projects write):
the source columns (``id``, ``question``, ``golden_answers``) followed by ``data_source``,
``prompt = [{"role": "user", "content": <prompt text>}]``, ``ability = "fact-reasoning"``,
``reward_model = {"style": "rule", "ground_truth": {"target": answers, "search_keys": K}}`` and
``extra_info = {"split", "index", "support_docs"}``. ``search_keys`` holds only the non-empty key
groups (what the key reward averages over, METHOD.md §2c). For a lossless round trip we add
``extra_info.sub_questions`` (question, answer, keys per hop) and ``extra_info.metadata`` (JSON).
Foreign rows without them get one hop per key group (question = its first key). Support docs
without a hop index go to hops in order (doc i → hop min(i, hops − 1)); without hops at all, each
doc becomes a hop titled by the doc.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from stepsearch.data.corpus import passage_id
from stepsearch.data.fields import (
    MISSING,
    OUT_OF_RANGE,
    WRONG_TYPE,
    RowError,
    answer_list,
    at,
    get,
    get_dict,
    get_str,
    str_list,
)
from stepsearch.data.official import ParseContext, Parsed, canonical_dataset
from stepsearch.data.schema import Example, GoldenPassage, SubQuestion
from stepsearch.errors import DataError
from stepsearch.rollout.template import format_prompt

WRITABLE_FORMATS = ("stepsearch", "stepsearch_release", "searchr1_parquet")

# ------------------------------------------------------------------------------- prompt text


def prompt_text(question: str, template: str = "think") -> str:
    """The user-turn text of a question, as the rollout sees it (raw text, no chat template)."""
    return format_prompt(question, template=template)


_QUESTION_IN_PROMPT = re.compile(r"Question:\s*(.+?)\s*$", re.DOTALL)


def question_from_prompt(prompt: Any) -> str | None:
    """The question at the end of a Search-R1 style prompt (after the last ``Question:``)."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or "Question:" not in prompt:
        return None
    match = _QUESTION_IN_PROMPT.search(prompt[prompt.rindex("Question:"):])
    return match.group(1).strip() if match else None


# ------------------------------------------------------------------------------- shared: hops


def _doc(raw: Any, field: str, prefix: str) -> tuple[GoldenPassage, int | None]:
    if not isinstance(raw, dict):
        raise RowError(WRONG_TYPE, f"field '{field}' should be an object with title and paragraph_text")
    with at(field):
        title = get_str(raw, "title", allow_empty=True, default="")
        text = get_str(raw, "paragraph_text" if "paragraph_text" in raw else "text")
    pid = raw.get("id")
    if not isinstance(pid, str) or not pid:
        pid = passage_id(prefix, title.strip(), text.strip())
    hop = raw.get("sub_question")
    if hop is not None and (not isinstance(hop, int) or isinstance(hop, bool)):
        raise RowError(WRONG_TYPE, f"field '{field}.sub_question' should be an integer")
    return GoldenPassage(pid, title, text), hop


def _key_groups(raw: Any, field: str) -> list[list[str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RowError(WRONG_TYPE, f"field '{field}' should be a list of lists of strings")
    return [str_list(g if g is not None else [], f"{field}[{i}]") for i, g in enumerate(raw)]


def assemble_hops(questions: list[str], answers: list[str], keys: list[list[str]], docs: Any, field: str, prefix: str) -> list[SubQuestion]:
    """Sub-questions from parallel lists plus support docs (flat, nested per hop, or hop-indexed)."""
    n = max(len(questions), len(answers), len(keys))
    subs = [
        SubQuestion(
            question=questions[i] if i < len(questions) else (keys[i][0] if i < len(keys) and keys[i] else ""),
            answer=answers[i] if i < len(answers) else "",
            search_keys=list(keys[i]) if i < len(keys) else [],
        )
        for i in range(n)
    ]
    if docs is None:
        return subs
    if not isinstance(docs, list):
        raise RowError(WRONG_TYPE, f"field '{field}' should be a list")
    placed: list[tuple[GoldenPassage, int | None]] = []
    for i, item in enumerate(docs):
        if isinstance(item, list):  # nested: one list of docs per hop
            placed += [(_doc(d, f"{field}[{i}][{k}]", prefix)[0], i) for k, d in enumerate(item)]
        else:
            placed.append(_doc(item, f"{field}[{i}]", prefix))
    if not subs:
        return [SubQuestion(question=g.title, golden=[g]) for g, _ in placed]
    flat_unindexed = all(h is None for _, h in placed)
    for i, (golden, hop) in enumerate(placed):
        if hop is None:
            hop = i if flat_unindexed and len(placed) == n else min(i, n - 1)
        if not 0 <= hop < n:
            raise RowError(OUT_OF_RANGE, f"{field}: sub_question={hop} out of range ({n} sub-questions)")
        subs[hop].golden.append(golden)
    return subs


def _metadata(raw: Any) -> dict:
    if isinstance(raw, dict):
        return dict(raw)
    if isinstance(raw, str) and raw:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return {"metadata": raw}
        return value if isinstance(value, dict) else {"metadata": value}
    return {}


# ------------------------------------------------------------------------------- readers


def parse_release(row: dict, ctx: ParseContext) -> Parsed:
    ex_id = get_str(row, "id", default=ctx.fallback_id)
    question = get_str(row, "question")
    first = row.get("final_answer", row.get("answer"))
    if first is None:
        raise RowError(MISSING, "missing field 'final_answer'")
    answers = answer_list(first, row.get("answer_aliases"), "final_answer")
    subs = assemble_hops(
        str_list(row.get("sub_questions") or [], "sub_questions"),
        str_list(row.get("sub_answers") or [], "sub_answers"),
        _key_groups(row.get("sub_searchs"), "sub_searchs"),
        row.get("sub_support_docs"),
        "sub_support_docs",
        ctx.prefix,
    )
    dataset = row["dataset"] if isinstance(row.get("dataset"), str) and row["dataset"] else ctx.dataset
    return Example(ex_id, question, answers, dataset, subs, _metadata(row.get("metadata"))), []


def parse_searchr1(row: dict, ctx: ParseContext) -> Parsed:
    reward_model = get_dict(row, "reward_model")
    with at("reward_model"):
        truth = get_dict(reward_model, "ground_truth")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    target = truth.get("target", row.get("golden_answers"))
    if target is None:
        raise RowError(MISSING, "missing field 'reward_model.ground_truth.target'")
    answers = answer_list(target, None, "reward_model.ground_truth.target")
    question = row.get("question") if isinstance(row.get("question"), str) and row["question"].strip() else None
    question = question or question_from_prompt(row.get("prompt"))
    if not question:
        raise RowError(MISSING, "no 'question' field and no 'Question:' in the prompt")
    ex_id = row.get("id") or extra.get("id")
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool) or ex_id == "":
        ex_id = f"{row.get('data_source', ctx.dataset)}-{extra['split']}-{extra['index']}" if "index" in extra and "split" in extra else ctx.fallback_id
    hops = extra.get("sub_questions")
    if isinstance(hops, list) and hops:
        questions, sub_answers, keys = [], [], []
        for j, hop in enumerate(hops):
            with at(f"extra_info.sub_questions[{j}]"):
                if not isinstance(hop, dict):
                    raise RowError(WRONG_TYPE, f"extra_info.sub_questions[{j}] should be an object")
                questions.append(get_str(hop, "question", allow_empty=True, default=""))
                sub_answers.append(get_str(hop, "answer", allow_empty=True, default=""))
                keys.append(str_list(get(hop, "search_keys", []), "search_keys"))
    else:
        keys = _key_groups(truth.get("search_keys"), "reward_model.ground_truth.search_keys")
        questions, sub_answers = [g[0] if g else "" for g in keys], []
    subs = assemble_hops(questions, sub_answers, keys, extra.get("support_docs"), "extra_info.support_docs", ctx.prefix)
    source = row.get("data_source")
    dataset = canonical_dataset(source) if isinstance(source, str) and source else ctx.dataset
    return Example(str(ex_id), question, answers, dataset, subs, _metadata(extra.get("metadata"))), []


# ------------------------------------------------------------------------------- writers


def _support_docs(example: Example) -> list[dict]:
    return [
        {"id": g.id, "title": g.title, "paragraph_text": g.text, "sub_question": i}
        for i, sq in enumerate(example.sub_questions)
        for g in sq.golden
    ]


def release_row(example: Example) -> dict:
    """One StepSearch release row (see the module docstring)."""
    return {
        "id": example.id,
        "question": example.question,
        "final_answer": example.answers[0],
        "answer_aliases": example.answers[1:],
        "hops": example.num_hops,
        "sub_questions": [sq.question for sq in example.sub_questions],
        "sub_answers": [sq.answer for sq in example.sub_questions],
        "sub_searchs": [list(sq.search_keys) for sq in example.sub_questions],
        "sub_support_docs": _support_docs(example),
        "dataset": example.dataset,
        "metadata": example.metadata,
    }


def searchr1_row(example: Example, index: int, split: str, template: str = "think") -> dict:
    """One Search-R1/StepSearch parquet row (see the module docstring)."""
    return {
        "id": example.id,
        "question": example.question,
        "golden_answers": list(example.answers),
        "data_source": example.dataset,
        "prompt": [{"role": "user", "content": prompt_text(example.question, template)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(example.answers), "search_keys": example.search_keys}},
        "extra_info": {
            "split": split,
            "index": index,
            "support_docs": _support_docs(example),
            "sub_questions": [{"question": sq.question, "answer": sq.answer, "search_keys": list(sq.search_keys)} for sq in example.sub_questions],
            "metadata": json.dumps(example.metadata, ensure_ascii=False),
        },
    }


def _searchr1_schema():
    import pyarrow as pa

    s = pa.string()
    doc = pa.struct([("id", s), ("title", s), ("paragraph_text", s), ("sub_question", pa.int64())])
    hop = pa.struct([("question", s), ("answer", s), ("search_keys", pa.list_(s))])
    truth = pa.struct([("target", pa.list_(s)), ("search_keys", pa.list_(pa.list_(s)))])
    extra = pa.struct([("split", s), ("index", pa.int64()), ("support_docs", pa.list_(doc)), ("sub_questions", pa.list_(hop)), ("metadata", s)])
    return pa.schema(
        [
            ("id", s),
            ("question", s),
            ("golden_answers", pa.list_(s)),
            ("data_source", s),
            ("prompt", pa.list_(pa.struct([("role", s), ("content", s)]))),
            ("ability", s),
            ("reward_model", pa.struct([("style", s), ("ground_truth", truth)])),
            ("extra_info", extra),
        ]
    )


def write_examples(
    examples: list[Example], path: str | Path, format: str = "stepsearch", split: str = "train", template: str = "think"
) -> Path:
    """Write examples as ``stepsearch`` JSONL (``Example.to_dict()`` per line), ``stepsearch_release``
    JSONL, or ``searchr1_parquet``. ``split`` fills ``extra_info.split`` and ``template`` names the
    prompt template (``think`` | ``plan``) of parquet rows."""
    if format not in WRITABLE_FORMATS:
        raise DataError(f"cannot write format {format!r}; writable formats: {', '.join(WRITABLE_FORMATS)}")
    path = Path(path)
    try:
        return _write_rows(examples, path, format, split, template)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None


def _write_rows(examples, path: Path, format: str, split: str, template: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "searchr1_parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [searchr1_row(ex, i, split, template) for i, ex in enumerate(examples)]
        pq.write_table(pa.Table.from_pylist(rows, schema=_searchr1_schema()), path)
        return path
    to_row = release_row if format == "stepsearch_release" else Example.to_dict
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_row(ex), ensure_ascii=False) + "\n")
    return path
