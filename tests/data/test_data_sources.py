"""Readers on every shared raw file: detected formats, counts and field-level facts looked up in
the data, golden passages verbatim in the shared corpus."""

from __future__ import annotations

import pytest

from stepsearch.data.corpus import passage_id
from stepsearch.data.sources import FORMATS, detect_format, load_examples, read_examples
from stepsearch.errors import DataError
from stepsearch.retrieval.corpus import read_corpus

RAW_FILES = {
    # file: (format, dataset, rows)
    "hotpot_dev_distractor_sample.json": ("hotpotqa", "hotpotqa", 150),
    "musique_ans_dev_sample.jsonl": ("musique", "musique", 150),
    "2wikimultihopqa_dev_sample.json": ("2wiki", "2wikimultihopqa", 120),
    "bamboogle_test.jsonl": ("flashrag", "bamboogle", 125),
    "nq_test_sample.jsonl": ("flashrag", "nq", 200),
    "triviaqa_sample.jsonl": ("flashrag", "triviaqa", 200),
}


@pytest.fixture(scope="session")
def read_raw(raw_dir):
    cache = {}

    def read(name: str):
        if name not in cache:
            cache[name] = read_examples(raw_dir / name)
        return cache[name]

    return read


@pytest.fixture(scope="session")
def shared_corpus(corpus_path):
    return {p.id: p for p in read_corpus(corpus_path).passages}


def by_id(result, ex_id):
    return next(ex for ex in result.examples if ex.id == ex_id)


def test_every_raw_file_is_covered(raw_dir):
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(RAW_FILES)


@pytest.mark.parametrize("name", sorted(RAW_FILES))
def test_raw_file_counts_and_format(read_raw, name):
    fmt, dataset, rows = RAW_FILES[name]
    result = read_raw(name)
    assert result.format == fmt
    assert result.rows == rows and len(result.examples) == rows and result.skipped == []
    assert {ex.dataset for ex in result.examples} == {dataset}
    assert len({ex.id for ex in result.examples}) == rows
    assert all(ex.answers and all(a.strip() for a in ex.answers) for ex in result.examples)


def test_musique_known_example(read_raw):
    result = read_raw("musique_ans_dev_sample.jsonl")
    ex = by_id(result, "2hop__574419_270105")
    assert ex.question == "What is the seat of the county where Van Hook Township is located?"
    assert ex.answers == ["Stanley"]
    assert [sq.question for sq in ex.sub_questions] == [
        "Van Hook Township >> located in the administrative territorial entity",
        "Mountrail County >> capital",  # "#1" resolved to hop 1's answer
    ]
    assert [sq.answer for sq in ex.sub_questions] == ["Mountrail County", "Stanley"]
    assert [g.title for sq in ex.sub_questions for g in sq.golden] == ["Van Hook Township, Mountrail County, North Dakota", "Mountrail County Courthouse"]
    assert ex.sub_questions[1].search_keys[0] == "Mountrail County capital"
    assert ex.metadata["decomposition"][1] == "#1 >> capital"
    aliases = by_id(result, "2hop__335418_279684").answers
    assert aliases == ["Pittsburgh Pirates", "Orioles", "Pirates", "Baltimore Orioles", "New York Mets", "Mets"]
    four = by_id(result, "4hop1__638706_765799_282674_759393")
    assert four.answers == ["Green Bay"] and four.num_hops == 4
    assert [sq.answer for sq in four.sub_questions] == ["Appleton", "Outagamie County", "Brown County", "Green Bay"]
    assert four.sub_questions[3].question == "Brown County >> capital"
    # hop counts in the sample: 122 two-hop, 15 three-hop, 13 four-hop
    hops = [ex.num_hops for ex in result.examples]
    assert (hops.count(2), hops.count(3), hops.count(4)) == (122, 15, 13)


def test_hotpot_known_example(read_raw):
    ex = by_id(read_raw("hotpot_dev_distractor_sample.json"), "5a7f6fd75542992e7d278cfa")
    assert ex.answers == ["Rush"]
    assert {g.title for g in ex.golden_passages} == {"Nobody's Hero", "Neil Peart"}
    assert ex.metadata == {"type": "bridge", "level": "hard"}
    assert ex.sub_questions[-1].answer == "Rush"
    assert all(sq.search_keys for sq in ex.sub_questions)
    # HotpotQA text = the sentences concatenated (they carry their own leading spaces)
    peart = next(g for g in ex.golden_passages if g.title == "Neil Peart")
    assert peart.text.startswith("Neil Ellwood Peart") and peart.id == passage_id("hotpotqa", "Neil Peart", peart.text)


def test_2wiki_known_example(read_raw):
    result = read_raw("2wikimultihopqa_dev_sample.json")
    ex = by_id(result, "b088d3ca08e211ebbda4ac1f6bf848b6")
    assert ex.answers == ["Free Guy"] and ex.metadata["type"] == "bridge_comparison"
    assert [sq.answer for sq in ex.sub_questions] == ["Pál Gábor", "Shawn Levy", "2 November 1932", "July 23, 1968"]
    assert [sq.golden[0].title for sq in ex.sub_questions] == ["Forbidden Ground", "Free Guy", "Pál Gábor", "Shawn Levy"]
    assert ex.sub_questions[0].question == "What is the director of Forbidden Ground?"
    assert "Forbidden Ground director" in ex.sub_questions[0].search_keys
    # a triple subject that is not a title ("The Zone") maps to the disambiguated page
    zone = next(e for e in result.examples if e.question.startswith("What is the place of birth of the director of film The Zone"))
    assert zone.sub_questions[0].golden[0].title == "The Zone (2017 film)"
    assert zone.answers == ["Montreal, Quebec"]


def test_flashrag_known_examples(read_raw):
    bamboogle = read_raw("bamboogle_test.jsonl").examples[0]
    assert (bamboogle.id, bamboogle.answers, bamboogle.sub_questions) == ("test_0", ["james madison"], [])
    nq = read_raw("nq_test_sample.jsonl").examples[0]
    assert nq.answers == ["14 December 1972 UTC", "December 1972"]
    tqa = read_raw("triviaqa_sample.jsonl").examples[0]
    assert (tqa.id, tqa.answers) == ("tqa_0", ["Phar Lap", "Pharlap", "Phar"])


@pytest.mark.parametrize("name", ["musique_ans_dev_sample.jsonl", "hotpot_dev_distractor_sample.json", "2wikimultihopqa_dev_sample.json"])
def test_golden_passages_are_verbatim_in_the_shared_corpus(read_raw, shared_corpus, name):
    result = read_raw(name)
    golden = [g for ex in result.examples for g in ex.golden_passages]
    assert len(golden) >= 2 * len(result.examples)  # every multi-hop example has >= 2 golden paragraphs
    for g in golden:
        assert g.id in shared_corpus, g
        assert (shared_corpus[g.id].title, shared_corpus[g.id].text) == (g.title, g.text)
    # all context paragraphs (distractors too) carry the shared corpus' ids
    assert all(p.id in shared_corpus for p in result.passages)
    assert all(sq.golden and sq.search_keys for ex in result.examples for sq in ex.sub_questions)


def test_detect_format_by_fields():
    assert detect_format({"id": "x", "question": "q", "golden_answers": ["a"]}) == "flashrag"
    assert detect_format({"prompt": [], "reward_model": {}}) == "searchr1_parquet"
    assert detect_format({"question": "q", "final_answer": "a", "sub_searchs": []}) == "stepsearch_release"
    assert detect_format({"question": "q", "answers": ["a"]}) == "stepsearch"
    assert detect_format({"question": "q", "label": 1}) is None


def test_format_override_and_dataset_override(raw_dir):
    result = read_examples(raw_dir / "nq_test_sample.jsonl", format="flashrag", dataset="my-nq", limit=5)
    assert len(result.examples) == 5 and result.rows == 5
    assert {ex.dataset for ex in result.examples} == {"my-nq"}
    with pytest.raises(DataError, match="none of 150 rows could be read as format 'flashrag'"):
        read_examples(raw_dir / "musique_ans_dev_sample.jsonl", format="flashrag")


def test_unknown_format_names_the_known_ones(raw_dir, tmp_path):
    with pytest.raises(DataError) as err:
        read_examples(raw_dir / "nq_test_sample.jsonl", format="squad")
    assert all(f in str(err.value) for f in FORMATS)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "hello", "label": 1}\n')
    with pytest.raises(DataError, match="cannot tell the format .*fields seen: label, text.*known formats: stepsearch, hotpotqa"):
        read_examples(odd)


def test_missing_source_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="no such local file, and loading it as a Hugging Face hub dataset failed"):
        load_examples(str(tmp_path / "nope" / "missing.jsonl"))


def test_hotpot_hub_layout(tmp_path, raw_dir, read_raw):
    """The hub's ``hotpot_qa`` rows hold context/supporting_facts as column dicts: same example."""
    import json

    row = json.loads((raw_dir / "hotpot_dev_distractor_sample.json").read_text(encoding="utf-8"))[0]
    row["context"] = {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}
    row["supporting_facts"] = {"title": [t for t, _ in row["supporting_facts"]], "sent_id": [i for _, i in row["supporting_facts"]]}
    row["id"] = row.pop("_id")
    path = tmp_path / "hotpot_qa_hub.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (ex,) = read_examples(path).examples
    assert ex == read_raw("hotpot_dev_distractor_sample.json").examples[0]
