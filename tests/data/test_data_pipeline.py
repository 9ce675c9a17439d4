"""The training-set pipeline on the shared raw files: corpus, golden passages verbatim in it, keys,
BM25 filtering (real Pyserini index over the written corpus) and the ``data build`` command."""

from __future__ import annotations

import copy
import json

import pytest

from stepsearch.cli import main
from stepsearch.data.corpus import write_corpus
from stepsearch.data.keys import normalize
from stepsearch.data.pipeline import build_training_set, filter_search_keys
from stepsearch.errors import DataError
from stepsearch.retrieval.corpus import read_corpus

RAW = {"musique": "musique_ans_dev_sample.jsonl", "hotpotqa": "hotpot_dev_distractor_sample.json", "2wiki": "2wikimultihopqa_dev_sample.json"}


@pytest.fixture(scope="session")
def built(raw_dir, tmp_path_factory):
    """source -> (PipelineResult, {id: Passage} of the corpus written and read back)."""
    out = {}
    root = tmp_path_factory.mktemp("built")
    for source, name in RAW.items():
        result = build_training_set(source, raw_dir / name)
        path = root / f"{source}_corpus.jsonl"
        assert write_corpus(result.passages, path) == len(result.passages)
        out[source] = (result, {p.id: p for p in read_corpus(path, strict=True).passages}, path)
    return out


@pytest.fixture(scope="session")
def musique_retriever(built, tmp_path_factory):
    from stepsearch.retrieval.factory import load_retriever
    from stepsearch.retrieval.index import build_index

    index_dir = tmp_path_factory.mktemp("musique_bm25") / "index"
    build_index(built["musique"][2], index_dir, "bm25", show_progress=False)
    return load_retriever(index_dir)


@pytest.mark.parametrize("source", sorted(RAW))
def test_golden_passages_are_verbatim_in_the_written_corpus(built, source):
    result, corpus, _ = built[source]
    assert len(corpus) == len(result.passages)  # deduplicated, ids unique
    for ex in result.examples:
        assert ex.sub_questions
        for sq in ex.sub_questions:
            assert sq.search_keys, (ex.id, sq)
            assert sq.golden, (ex.id, sq)
            for g in sq.golden:
                assert (corpus[g.id].title, corpus[g.id].text) == (g.title, g.text)


def test_musique_build_counts(built):
    result, corpus, _ = built["musique"]
    s = result.summary
    assert (s.rows, s.examples, sum(s.skipped.values())) == (150, 150, 0)
    assert s.sub_questions == s.sub_questions_with_golden == 2 * 122 + 3 * 15 + 4 * 13
    assert s.keys_generated == sum(len(sq.search_keys) for ex in result.examples for sq in ex.sub_questions)
    assert s.corpus_passages == len(corpus) == 2342  # 3000 paragraphs, some shared between questions
    assert not s.filtered and s.kept_ratio == 1.0
    # every answerable sub-question has >= 2 keys, the first being the #k-resolved text
    ex = next(e for e in result.examples if e.id == "2hop__29367_29376")
    assert ex.sub_questions[1].search_keys[0] == "What event caused Robert Menzies to become Prime Minister"


def test_hotpot_supporting_titles_map_to_corpus_passages(built, raw_dir):
    result, corpus, _ = built["hotpotqa"]
    rows = {r["_id"]: r for r in json.loads((raw_dir / RAW["hotpotqa"]).read_text(encoding="utf-8"))}
    for ex in result.examples:
        titles = {t for t, _ in rows[ex.id]["supporting_facts"]}
        assert {g.title for g in ex.golden_passages} == titles
        for g in ex.golden_passages:
            sentences = dict(rows[ex.id]["context"])[g.title]
            assert corpus[g.id].text == "".join(sentences).strip()


def test_2wiki_keys_come_from_evidence_triples(built, raw_dir):
    result, _, _ = built["2wiki"]
    rows = {r["_id"]: r for r in json.loads((raw_dir / RAW["2wiki"]).read_text(encoding="utf-8"))}
    for ex in result.examples:
        triples = rows[ex.id]["evidences"]
        assert [sq.answer for sq in ex.sub_questions] == [o.strip() for _, _, o in triples]
        assert all(r in sq.search_keys[0] for sq, (_, r, _) in zip(ex.sub_questions, triples))


def test_bm25_filter_keeps_exactly_the_keys_that_hit_golden(built, musique_retriever):
    result = built["musique"][0]
    examples = copy.deepcopy(result.examples)
    before = {(ex.id, j): list(sq.search_keys) for ex in examples for j, sq in enumerate(ex.sub_questions)}
    stats = filter_search_keys(examples, musique_retriever, k=3)
    assert stats.checked == result.summary.keys_generated and stats.unfilterable == 0
    assert 0 < stats.kept < stats.checked
    # independent check, one query at a time
    for ex in examples[:40]:
        for j, sq in enumerate(ex.sub_questions):
            golden = {g.id for g in sq.golden}
            for key in before[(ex.id, j)]:
                (hits,) = musique_retriever.search([key], 3)
                assert (key in sq.search_keys) == bool(golden & {p.id for p in hits}), key


def test_pipeline_with_retriever_reports_the_ratio(raw_dir, musique_retriever):
    result = build_training_set("musique", raw_dir / RAW["musique"], limit=30, retriever=musique_retriever, filter_k=5)
    s = result.summary
    assert s.filtered and s.filter_k == 5 and s.examples == 30
    assert s.kept_ratio == pytest.approx(s.keys_kept / s.keys_checked)
    assert s.keys_kept == sum(len(sq.search_keys) for ex in result.examples for sq in ex.sub_questions)
    assert ("keys kept", f"{s.keys_kept} ({s.kept_ratio:.1%})") in s.table_rows()


def test_data_build_command(raw_dir, tmp_path, capsys):
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "train.jsonl"
    argv = ["data", "build", "--source", "musique", "--input", str(raw_dir / RAW["musique"]), "--corpus", str(corpus), "--out", str(out), "--filter", "--limit", "25"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "data build summary" in printed and "kept-keys ratio: " in printed
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 25 and rows[0]["id"] == "2hop__574419_270105"
    ids = {json.loads(line)["id"] for line in corpus.read_text(encoding="utf-8").splitlines()}
    assert all(g["id"] in ids for r in rows for sq in r["sub_questions"] for g in sq["golden"])
    assert (tmp_path / "corpus_bm25").is_dir()


def test_data_build_bad_rows_and_strict(raw_dir, tmp_path, capsys):
    lines = (raw_dir / RAW["musique"]).read_text(encoding="utf-8").splitlines()[:3]
    bad = json.loads(lines[1])
    bad["question_decomposition"][1]["paragraph_support_idx"] = 40
    src = tmp_path / "musique_bad.jsonl"
    src.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n", encoding="utf-8")
    result = build_training_set("musique", src)
    assert result.summary.examples == 2 and dict(result.summary.skipped) == {"supporting index out of range": 1}
    assert ("  skipped: supporting index out of range", "1") in result.summary.table_rows()
    argv = ["data", "build", "--source", "musique", "--input", str(src), "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--strict"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "musique_bad.jsonl:2: question_decomposition[1].paragraph_support_idx=40" in capsys.readouterr().err.replace("\n", "")


def test_unknown_source():
    with pytest.raises(DataError, match="choose one of: musique, hotpotqa, 2wiki"):
        build_training_set("squad", "x.json")


def test_data_convert_command(raw_dir, tmp_path, capsys):
    out = tmp_path / "bamboogle.parquet"
    with pytest.raises(SystemExit):
        main(["data", "convert", "--input", str(raw_dir / "bamboogle_test.jsonl"), "--output", str(out), "--split", "test"])
    assert "examples written" in capsys.readouterr().out
    from stepsearch.data.sources import read_examples

    back = read_examples(out)
    assert back.format == "searchr1_parquet" and len(back.examples) == 125
    assert back.examples[0].answers == ["james madison"] and back.examples[0].dataset == "bamboogle"
    assert normalize(back.examples[0].question) == normalize("Who was president of the United States in the year that Citibank was founded?")
