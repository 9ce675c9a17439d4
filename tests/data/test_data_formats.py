"""Writers and round trips: our rows → StepSearch release / Search-R1 parquet → our reader gives the
same examples; rows written by the released scripts are read."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepsearch.data.formats import question_from_prompt
from stepsearch.data.sources import read_examples, write_examples
from stepsearch.errors import DataError

SOURCES = ["musique_ans_dev_sample.jsonl", "hotpot_dev_distractor_sample.json", "2wikimultihopqa_dev_sample.json", "bamboogle_test.jsonl"]


@pytest.fixture(scope="module")
def examples(raw_dir):
    out = []
    for name in SOURCES:
        out += read_examples(raw_dir / name, limit=20).examples
    out[0].metadata["note"] = {"nested": [1, 2]}
    out[1].sub_questions[1].search_keys = []  # a hop whose keys were all filtered out
    return out


@pytest.mark.parametrize("fmt,suffix", [("stepsearch", "jsonl"), ("stepsearch_release", "jsonl"), ("searchr1_parquet", "parquet")])
def test_round_trip(examples, tmp_path, fmt, suffix):
    path = write_examples(examples, tmp_path / f"out.{suffix}", format=fmt)
    back = read_examples(path)
    assert back.format == fmt
    assert back.examples == examples


def test_parquet_mirrors_the_search_r1_layout(examples, tmp_path):
    path = write_examples(examples, tmp_path / "train.parquet", format="searchr1_parquet", split="train")
    table = pq.read_table(path)
    assert table.column_names == ["id", "question", "golden_answers", "data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = table.slice(0, 1).to_pylist()[0]
    ex = examples[0]
    assert row["data_source"] == "musique" and row["ability"] == "fact-reasoning"
    assert row["prompt"][0]["role"] == "user"
    assert row["prompt"][0]["content"].rstrip().endswith(f"Question: {ex.question.strip()}")
    assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": ex.answers, "search_keys": ex.search_keys}}
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == 0
    docs = row["extra_info"]["support_docs"]
    assert [(d["title"], d["paragraph_text"]) for d in docs] == [(g.title, g.text) for sq in ex.sub_questions for g in sq.golden]
    # the filtered-out hop is absent from ground_truth.search_keys (released reward averages over groups)
    hop_less = table.slice(1, 1).to_pylist()[0]
    assert len(hop_less["reward_model"]["ground_truth"]["search_keys"]) == examples[1].num_hops - 1


def test_release_rows_have_the_released_fields(examples, tmp_path):
    path = write_examples(examples[:1], tmp_path / "musi.jsonl", format="stepsearch_release")
    row = json.loads(path.read_text(encoding="utf-8"))
    ex = examples[0]
    assert row["final_answer"] == ex.answers[0] and row["answer_aliases"] == ex.answers[1:]
    assert row["sub_searchs"] == [sq.search_keys for sq in ex.sub_questions]
    assert [d["paragraph_text"] for d in row["sub_support_docs"]] == [g.text for g in ex.golden_passages]


def test_reads_rows_written_by_the_released_scripts(tmp_path, raw_dir):
    """Rows as Search-R1's nq_search.py / StepSearch's musi_search.py write them (schema inferred)."""
    prompt = "## Background\nYou are a deep AI research assistant ... Question: who wrote hamlet?\n"
    rows = [
        {
            "id": "test_0", "question": "who wrote hamlet", "golden_answers": ["Shakespeare"],
            "data_source": "nq", "prompt": [{"role": "user", "content": prompt}], "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": ["Shakespeare"], "search_keys": []}},
            "extra_info": {"split": "test", "index": 0, "support_docs": []},
        }
    ]
    path = tmp_path / "nq_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (ex,) = read_examples(path).examples
    assert (ex.id, ex.question, ex.answers, ex.dataset, ex.sub_questions) == ("test_0", "who wrote hamlet", ["Shakespeare"], "nq", [])

    # StepSearch musi rows: no id/question columns, flat support docs copied from MuSiQue paragraphs
    musique = json.loads((raw_dir / "musique_ans_dev_sample.jsonl").read_text(encoding="utf-8").splitlines()[0])
    support = [musique["paragraphs"][8], musique["paragraphs"][1]]
    musi = {
        "data_source": "musi",
        "prompt": [{"role": "user", "content": "...\n Question: What is the seat of the county where Van Hook Township is located?\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Stanley"], "search_keys": [["Van Hook Township county"], ["Mountrail County seat", "capital of Mountrail County"]]}},
        "extra_info": {"split": "train", "index": 7, "support_docs": support},
    }
    path = tmp_path / "musi_stepsearch_train.parquet"
    pq.write_table(pa.Table.from_pylist([musi]), path)
    (ex,) = read_examples(path).examples
    assert ex.id == "musi-train-7" and ex.dataset == "musique"
    assert ex.question == "What is the seat of the county where Van Hook Township is located?"
    assert ex.search_keys == [["Van Hook Township county"], ["Mountrail County seat", "capital of Mountrail County"]]
    assert [[g.title for g in sq.golden] for sq in ex.sub_questions] == [["Van Hook Township, Mountrail County, North Dakota"], ["Mountrail County Courthouse"]]
    # ids computed like the corpus builder's: the same as reading the raw MuSiQue row
    raw = read_examples(raw_dir / "musique_ans_dev_sample.jsonl", limit=1).examples[0]
    assert [g.id for g in ex.golden_passages] == [g.id for g in raw.golden_passages]


def test_release_jsonl_from_the_released_pipeline(tmp_path):
    row = {
        "id": 3, "question": "Who is the father of X's mother?", "final_answer": "Z", "answer_aliases": ["Zed"],
        "sub_questions": ["Who is X's mother?", "Who is #1's father?"], "sub_answers": ["Y", "Z"],
        "sub_searchs": [["X mother"], ["Y father", "father of Y"]],
        "sub_support_docs": [[{"title": "X", "paragraph_text": "X's mother is Y."}], [{"title": "Y", "paragraph_text": "Y is Z's child."}]],
    }
    path = tmp_path / "musi_answerable_dev.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (ex,) = read_examples(path).examples
    assert ex.id == "3" and ex.answers == ["Z", "Zed"] and ex.dataset == "musique"
    assert [sq.answer for sq in ex.sub_questions] == ["Y", "Z"]
    assert [[g.title for g in sq.golden] for sq in ex.sub_questions] == [["X"], ["Y"]]


def test_question_from_prompt():
    assert question_from_prompt([{"role": "user", "content": "Answer... Question: Who? \n"}]) == "Who?"
    assert question_from_prompt("no question marker here") is None


def test_unknown_output_format(tmp_path, examples):
    with pytest.raises(DataError, match="writable formats: stepsearch, stepsearch_release, searchr1_parquet"):
        write_examples(examples, tmp_path / "x.csv", format="csv")
