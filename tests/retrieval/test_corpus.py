"""Corpus reading/writing: both layouts, bad lines reported with file:line, strict mode."""

from __future__ import annotations

import json

import pytest

from stepsearch.errors import DataError, RetrievalError
from stepsearch.retrieval.base import Passage, check_search_args, split_contents
from stepsearch.retrieval.corpus import read_corpus, write_corpus


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_shared_corpus_reads_completely(corpus, corpus_path):
    assert len(corpus.passages) == 7416
    assert corpus.skipped == []
    first = corpus.passages[0]
    assert first.id == "hotpotqa-ec8d9019af02"
    assert first.title == "Jeff Porcaro"
    assert first.text.startswith("Jeffrey Thomas Porcaro (April 1, 1954")
    assert len({p.id for p in corpus.passages}) == 7416


def test_both_layouts_and_bad_lines(tmp_path):
    path = _write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "contents": '"Alpha"\nThe first letter.'}),
            json.dumps({"id": "b", "title": "Beta", "text": "The second letter."}),
            "{not json",
            json.dumps({"id": "c"}),
            json.dumps({"contents": '"T"\nno id'}),
            json.dumps({"id": "a", "contents": '"Alpha again"\nduplicate'}),
            "",
            json.dumps(["a", "list"]),
            json.dumps({"id": 7, "text": "numeric id, no title"}),
        ],
    )
    result = read_corpus(path)
    assert [(p.id, p.title, p.text) for p in result.passages] == [
        ("a", "Alpha", "The first letter."),
        ("b", "Beta", "The second letter."),
        ("7", "", "numeric id, no title"),
    ]
    assert [s.line for s in result.skipped] == [3, 4, 5, 6, 8]
    reasons = [s.reason for s in result.skipped]
    assert reasons[0].startswith("malformed JSON")
    assert "need \"contents\"" in reasons[1]
    assert '"id"' in reasons[2]
    assert reasons[3].startswith('duplicate id "a"')
    assert "JSON object" in reasons[4]
    assert str(result.skipped[0]) == f"{path}:3: {reasons[0]}"
    assert "skipped 5 line(s)" in result.summary()


def test_strict_fails_at_first_bad_line_with_location(tmp_path):
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "text": "ok"}), '{"id": "b", "contents": 3}'])
    with pytest.raises(DataError, match=rf"{path}:2: \"contents\" is not a string"):
        read_corpus(path, strict=True)


def test_missing_empty_and_all_bad(tmp_path):
    with pytest.raises(DataError, match="corpus file not found"):
        read_corpus(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="directory"):
        read_corpus(tmp_path)
    empty = _write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no valid passages"):
        read_corpus(empty)
    bad = _write_lines(tmp_path / "bad.jsonl", ["nope", "[]"])
    with pytest.raises(DataError, match=r"no valid passages.*bad.jsonl:1: malformed JSON"):
        read_corpus(bad)


def test_write_then_read_roundtrip(tmp_path):
    passages = [Passage("x1", "Title with \"quotes\"", "Body one."), {"id": "x2", "title": "", "text": "Body two."}]
    path = tmp_path / "out" / "corpus.jsonl"
    assert write_corpus(passages, path) == 2
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"id": "x1", "contents": '"Title with "quotes""\nBody one.'}
    back = read_corpus(path).passages
    assert [(p.id, p.title, p.text) for p in back] == [("x1", 'Title with "quotes"', "Body one."), ("x2", "", "Body two.")]


def test_split_contents_without_title():
    assert split_contents('"T"\nbody') == ("T", "body")
    assert split_contents("no title line") == ("", "no title line")


@pytest.mark.parametrize(
    "queries,k,message",
    [
        (["ok"], 0, "k must be a positive integer"),
        (["ok"], -2, "k must be a positive integer"),
        (["ok"], True, "k must be a positive integer"),
        (["ok", "  "], 3, "query at position 1 is empty"),
        ("a string", 3, "queries must be a list"),
        (["ok", None], 3, "query at position 1 is NoneType"),
    ],
)
def test_search_argument_errors(queries, k, message):
    with pytest.raises(RetrievalError, match=message):
        check_search_args(queries, k)
