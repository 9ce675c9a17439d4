"""Bad rows: skipped with file:line and a counted reason, or a DataError under strict."""

from __future__ import annotations

import json

import pytest

from stepsearch.data.sources import read_examples
from stepsearch.errors import DataError


def musique_row(raw_dir, **changes) -> dict:
    """A real MuSiQue row (the sample's first) with some fields changed."""
    with open(raw_dir / "musique_ans_dev_sample.jsonl", encoding="utf-8") as f:
        row = json.loads(f.readline())
    for path, value in changes.items():
        target = row
        *parents, leaf = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is KeyError:
            del target[int(leaf) if leaf.isdigit() else leaf]
        else:
            target[int(leaf) if leaf.isdigit() else leaf] = value
    return row


@pytest.fixture()
def bad_musique(tmp_path, raw_dir):
    rows = [
        musique_row(raw_dir),  # line 1: good
        musique_row(raw_dir, id="missing-q", question=KeyError),  # line 2
        None,  # line 3: blank line
        musique_row(raw_dir, id="bad-type", answer={"text": "Stanley"}),  # line 4
        musique_row(raw_dir, id="bad-ref", question_decomposition__1__question="#3 >> capital"),  # line 5
        musique_row(raw_dir, id="bad-idx", question_decomposition__1__paragraph_support_idx=25),  # line 6
        musique_row(raw_dir, id="no-answer", answer="  ", answer_aliases=[]),  # line 7
        "{not json",  # line 8
        musique_row(raw_dir, id="unanswerable", answerable=False),  # line 9
        musique_row(raw_dir),  # line 10: same id as line 1
        musique_row(raw_dir, id="good-2"),  # line 11
    ]
    path = tmp_path / "musique_bad.jsonl"
    lines = ["" if r is None else (r if isinstance(r, str) else json.dumps(r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_are_skipped_with_line_and_reason(bad_musique):
    result = read_examples(bad_musique)
    assert result.format == "musique"
    assert [ex.id for ex in result.examples] == ["2hop__574419_270105", "good-2"]
    got = {(s.line, s.kind) for s in result.skipped}
    assert got == {
        (2, "missing field"),
        (4, "wrong type"),
        (5, "unresolvable #k"),
        (6, "supporting index out of range"),
        (7, "answers missing"),
        (8, "invalid JSON"),
        (9, "unanswerable"),
        (10, "duplicate id"),
    }
    assert result.rows == 10  # the blank line is not a row
    reasons = {s.line: str(s) for s in result.skipped}
    assert reasons[2] == f"{bad_musique}:2: missing field 'question'"
    assert "#3 does not refer to an earlier sub-question" in reasons[5]
    assert "paragraph_support_idx=25 names no paragraph (20 paragraphs)" in reasons[6]
    assert result.skip_counts()["wrong type"] == 1 and sum(result.skip_counts().values()) == 8


def test_strict_fails_at_the_first_bad_row(bad_musique):
    with pytest.raises(DataError, match=r"musique_bad.jsonl:2: missing field 'question' \(strict mode"):
        read_examples(bad_musique, strict=True)


def test_json_array_skip_names_line_and_row(tmp_path, raw_dir):
    rows = json.loads((raw_dir / "hotpot_dev_distractor_sample.json").read_text(encoding="utf-8"))[:3]
    rows[1]["supporting_facts"][0][1] = 99
    rows[2]["supporting_facts"].append(["Not In Context", 0])
    path = tmp_path / "hotpot_bad.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")  # pretty-printed: rows start on distinct lines
    result = read_examples(path)
    assert len(result.examples) == 1
    first, second = result.skipped
    assert first.kind == second.kind == "supporting index out of range"
    assert first.row == 1 and "sentence 99 of" in first.reason
    assert "'Not In Context' is not in the context" in second.reason
    text = path.read_text(encoding="utf-8").splitlines()
    assert text[first.line - 1].strip() == "{" and first.line > 2  # the line where row 1's object opens
    assert f"(row {first.row})" in str(first)


def test_broken_json_array_is_one_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a", "question": "q", "golden_answers": ["x"]},\n {"id": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json:2: invalid JSON in element 1"):
        read_examples(path)


def test_flashrag_wrong_types(tmp_path):
    path = tmp_path / "nq_mini.jsonl"
    rows = [
        {"id": "a", "question": "who?", "golden_answers": ["x", 3]},  # numbers are accepted as answers
        {"id": "b", "question": "who?", "golden_answers": [["nested"]]},
        {"id": "c", "question": 7, "golden_answers": ["x"]},
        {"id": "d", "question": "who?", "golden_answers": []},
        ["not", "an", "object"],
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    result = read_examples(path, format="flashrag")
    assert [ex.answers for ex in result.examples] == [["x", "3"]]
    assert [(s.line, s.kind) for s in result.skipped] == [(2, "wrong type"), (3, "wrong type"), (4, "answers missing"), (5, "not an object")]
    assert result.examples[0].dataset == "nq"


def test_unwritable_outputs_are_one_clear_error(tmp_path, raw_dir):
    """A directory given as an output file: DataError naming the path, not an IsADirectoryError."""
    import pytest

    from stepsearch.data.corpus import write_corpus
    from stepsearch.data.formats import write_examples
    from stepsearch.data.sources import load_examples
    from stepsearch.errors import DataError

    examples = load_examples(str(raw_dir / "bamboogle_test.jsonl"))[:2]
    with pytest.raises(DataError, match=f"cannot write {tmp_path}"):
        write_examples(examples, tmp_path)
    with pytest.raises(DataError, match=f"cannot write {tmp_path}"):
        write_corpus([], tmp_path)


def test_count_flags_reject_zero():
    import argparse

    import pytest

    from stepsearch.arguments import positive_int

    assert positive_int("3") == 3
    for bad in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)
