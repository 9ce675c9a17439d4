"""`python -m stepsearch index build | search`: outputs, bad input as one error line, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepsearch.cli import main


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # cli.py prints errors with rich, which wraps at 80 columns when not on a terminal.
    monkeypatch.setenv("COLUMNS", "400")


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_index_build_skips_bad_lines_and_strict_fails(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        json.dumps({"id": "a", "contents": '"Alpaca"\nAlpacas live in the Andes.'}) + "\n"
        "{broken json\n" + json.dumps({"id": "b", "title": "Llama", "text": "Llamas carry loads."}) + "\n"
    )
    code, out, err = run_cli(["index", "build", "--corpus", str(corpus), "--index", str(tmp_path / "i"), "--quiet"], capsys)
    assert code == 0
    assert "bm25 index built" in out and "passages" in out
    assert "skipped 1 bad corpus line(s)" in err and f"{corpus}:2: malformed JSON" in err
    code, _out, err = run_cli(
        ["index", "build", "--corpus", str(corpus), "--index", str(tmp_path / "j"), "--quiet", "--strict"], capsys
    )
    assert code == 2
    assert err.strip().startswith("error:") and f"{corpus}:2: malformed JSON" in err
    assert "Traceback" not in err


def test_search_single_query_prints_table(bm25_index, capsys):
    code, out, _err = run_cli(["search", "--index", str(bm25_index), "Who was the drummer of Toto?", "-k", "2"], capsys)
    assert code == 0
    assert "Jeff Porcaro" in out and "hotpotqa-ec8d9019af02" in out
    assert out.count("\n│ 1 │") == 1 and "│ 3 │" not in out


def test_search_queries_file_to_jsonl_in_input_order(bm25_index, bm25_retriever, tmp_path, capsys):
    queries = ["Mountrail County capital", "Jeff Porcaro drummer", "Neil Peart Rush", "Van Hook Township"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("".join(json.dumps({"query": q, "id": i}) + "\n" for i, q in enumerate(queries)))
    out_file = tmp_path / "run.jsonl"
    argv = ["search", "--index", str(bm25_index), "--queries", str(jsonl), "--output", str(out_file), "-k", "3",
            "--batch-size", "3"]
    code, _out, err = run_cli(argv, capsys)
    assert code == 0 and f"wrote 4 results to {out_file}" in err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    expected = bm25_retriever.search(queries, 3)
    assert [r["query"] for r in records] == queries
    for record, hits in zip(records, expected):
        assert [set(h) for h in record["hits"]] == [{"id", "title", "score"}] * 3
        assert [(h["id"], h["title"]) for h in record["hits"]] == [(h.id, h.title) for h in hits]
        assert [h["score"] for h in record["hits"]] == pytest.approx([h.score for h in hits])

    plain = tmp_path / "q.txt"
    plain.write_text("\n".join(queries[:2]) + "\n\n")
    code, out, _err = run_cli(["search", "--index", str(bm25_index), "--queries", str(plain), "-k", "1"], capsys)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["query"], r["hits"][0]["id"]) for r in lines] == [
        (queries[0], expected[0][0].id), (queries[1], expected[1][0].id)
    ]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["  "], "error: the query is empty"),
        ([], "error: give either one query (positional) or --queries FILE"),
        (["q", "--output", "x.jsonl"], "error: --output needs --queries FILE"),
    ],
)
def test_search_usage_errors(bm25_index, capsys, extra, message):
    code, _out, err = run_cli(["search", "--index", str(bm25_index), *extra], capsys)
    assert code == 2 and message in err


def test_search_bad_inputs_are_one_line(bm25_index, tmp_path, capsys):
    code, _out, err = run_cli(["search", "--index", str(bm25_index), "q", "-k", "0"], capsys)
    assert code == 2 and "expected a positive integer, got 0" in err
    code, _out, err = run_cli(["search", "--index", str(tmp_path), "q"], capsys)
    assert code == 2 and "is not an index" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "fine"}\n{"question": ""}\n')
    code, _out, err = run_cli(["search", "--index", str(bm25_index), "--queries", str(bad)], capsys)
    assert code == 2 and f'{bad}:2: needs a non-empty string field "query"' in err


def test_no_java_trace_reaches_the_user(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "segments_1").write_bytes(b"garbage")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), COLUMNS="400")
    result = subprocess.run(
        [sys.executable, "-m", "stepsearch", "search", "--index", str(broken), "anything"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: Using incubator")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: cannot open Lucene index") and "at org.apache" not in result.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--request-timeout", "0"], "error: --request-timeout must be > 0 seconds, got 0"),
        (["--batch-wait-ms", "-1"], "error: --batch-wait-ms must be >= 0, got -1"),
    ],
)
def test_serve_checks_limits_before_opening_the_index(tmp_path, capsys, extra, message):
    # The index does not exist: the limit check must come first (it used to come after the open).
    code, _out, err = run_cli(["serve", "--index", str(tmp_path / "missing"), *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
