"""Indexes built elsewhere: a FAISS file + corpus JSONL in the Search-R1/FlashRAG layout, and Lucene
folders made by Anserini's indexer without our metadata; open-time checks, CLI, service, datamodule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from stepsearch.cli import main
from training_fixtures import training_env  # noqa: F401  (fixture)
from stepsearch.errors import RetrievalError
from stepsearch.retrieval.dense import DenseRetriever
from stepsearch.retrieval.docstore import DocStore
from stepsearch.retrieval.factory import RetrieverConfig, build_retriever
from stepsearch.retrieval.index import attach_index, read_index_meta

QUERIES = ["Mountrail County capital", "Bansaan Island located in the administrative territorial entity"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(scope="module")
def search_r1_pair(tmp_path_factory, dense_index):
    """``e5_Flat.index`` + ``wiki-18.jsonl`` as Search-R1 distributes them, made from the session's
    dense index (MiniLM vectors of 300 shared-corpus passages): rows ``{"id", "contents"}`` in vector order."""
    folder = tmp_path_factory.mktemp("search-r1")
    shutil.copy(Path(dense_index) / "faiss.index", folder / "e5_Flat.index")
    store = DocStore(Path(dense_index))
    with (folder / "wiki-18.jsonl").open("w", encoding="utf-8") as handle:
        for row in range(len(store)):
            passage = store.get(row)
            handle.write(json.dumps({"id": passage.id, "contents": passage.contents}, ensure_ascii=False) + "\n")
    return folder / "e5_Flat.index", folder / "wiki-18.jsonl"


def _hits(results):
    return [[(h.id, h.title, h.text, round(h.score, 5)) for h in hits] for hits in results]


def test_faiss_file_with_its_corpus_answers_like_the_index_it_came_from(search_r1_pair, dense_retriever, encoder):
    faiss_file, corpus = search_r1_pair
    external = DenseRetriever(faiss_file, corpus=corpus, encoder=encoder)
    assert _hits(external.search(QUERIES, 5)) == _hits(dense_retriever.search(QUERIES, 5))
    assert external.num_docs == dense_retriever.num_docs > 200 and external.query_prefix == "query: "
    assert (corpus.parent / "wiki-18.jsonl.offsets.npy").is_file()  # line offsets cached beside the corpus
    again = DenseRetriever(faiss_file, corpus=corpus, encoder=encoder, mmap=True)
    assert _hits(again.search(QUERIES, 3)) == _hits(dense_retriever.search(QUERIES, 3))


def test_config_datamodule_and_service_open_it(search_r1_pair, dense_retriever, encoder, tmp_path):
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.retrieval.server import create_app, serve_in_thread

    faiss_file, corpus = search_r1_pair
    config = RetrieverConfig(kind="dense", index=str(faiss_file), corpus=str(corpus), query_prefix="query: ")
    module = StepSearchDataModule(train=[], retriever=config)
    module.prepare_data()  # must not try to build an index over the corpus
    assert isinstance(module.retriever, DenseRetriever)
    assert [h[0].id for h in module.retriever.search(QUERIES, 1)] == [h[0].id for h in dense_retriever.search(QUERIES, 1)]
    with serve_in_thread(create_app(module.retriever)) as service:
        health = httpx.get(f"{service.url}/health").json()
        top = httpx.post(f"{service.url}/retrieve", json={"queries": QUERIES[:1], "topk": 1}).json()
    assert (health["kind"], health["num_docs"], health["dim"], health["corpus"]) == \
        ("dense", dense_retriever.num_docs, 384, str(corpus))
    assert health["faiss_class"] == "IndexFlatIP" and health["faiss_file"] == str(faiss_file)
    assert top["result"][0][0]["id"] == dense_retriever.search(QUERIES[:1], 1)[0][0].id


def test_cli_attach_then_search(search_r1_pair, dense_retriever, tmp_path, capsys):
    faiss_file, corpus = search_r1_pair
    with pytest.raises(SystemExit) as info:
        main(["index", "build", "--faiss-file", str(faiss_file), "--corpus", str(corpus), "--index",
              str(tmp_path / "attached"), "--query-prefix", "query: ", "--quiet"])
    out = capsys.readouterr().out
    count = dense_retriever.num_docs
    assert info.value.code == 0 and "dense index attached" in out and f"│ {count} " in out
    meta = read_index_meta(tmp_path / "attached")
    assert (meta.count, meta.dim, meta.faiss_file, meta.docstore) == (count, 384, str(faiss_file), str(corpus))
    assert not (tmp_path / "attached" / "faiss.index").exists()  # nothing copied
    expected = dense_retriever.search(QUERIES[:1], 2)[0]
    for argv in (["search", "--index", str(tmp_path / "attached")],
                 ["search", "--index", str(faiss_file), "--corpus-jsonl", str(corpus)]):
        with pytest.raises(SystemExit) as info:
            main([*argv, QUERIES[0], "-k", "2"])
        out = capsys.readouterr().out
        assert info.value.code == 0 and expected[0].id in out and expected[1].id in out


def _error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_open_time_checks_are_one_line_each(search_r1_pair, encoder, tmp_path, capsys, monkeypatch):
    import faiss

    from stepsearch.retrieval.docstore import JsonlRowStore

    closed = []  # a failed open-time check closes the corpus store it opened
    real_close = JsonlRowStore.close
    monkeypatch.setattr(JsonlRowStore, "close", lambda store: (closed.append(store), real_close(store))[1])

    faiss_file, corpus = search_r1_pair
    rows = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    count = len(rows)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(rows[:-1]), encoding="utf-8")
    with pytest.raises(RetrievalError, match=rf"FAISS index {faiss_file} holds {count} vectors but corpus {short} "
                                             rf"has {count - 1} rows: vector i must be row i of the same corpus"):
        DenseRetriever(faiss_file, corpus=short, encoder=encoder)
    assert len(closed) == 1 and closed[0]._fd is None
    narrow = tmp_path / "narrow.index"
    small = faiss.IndexFlatIP(8)
    small.add(np.eye(8, dtype=np.float32)[np.arange(count) % 8])
    faiss.write_index(small, str(narrow))
    with pytest.raises(RetrievalError, match=r"gives 384-d vectors but FAISS index .*narrow.index holds 8-d vectors"):
        DenseRetriever(narrow, corpus=corpus, encoder=encoder)
    assert len(closed) == 2  # also after the encoder was loaded
    with pytest.raises(RetrievalError, match="is a FAISS file: give its corpus JSONL too"):
        DenseRetriever(faiss_file, encoder=encoder)
    err = _error_line(["index", "build", "--faiss-file", str(faiss_file), "--corpus", str(short),
                       "--index", str(tmp_path / "bad"), "--quiet"], capsys)
    assert err.startswith("error: FAISS index") and f"has {count - 1} rows" in err
    assert not (tmp_path / "bad").exists()  # a failed attach leaves nothing behind
    err = _error_line(["search", "--index", str(narrow), "--corpus-jsonl", str(corpus), "anything"], capsys)
    assert "gives 384-d vectors" in err and "holds 8-d vectors" in err


def test_a_broken_corpus_row_names_row_and_byte(search_r1_pair, encoder, tmp_path):
    faiss_file, corpus = search_r1_pair
    rows = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    external = DenseRetriever(faiss_file, corpus=corpus, encoder=encoder)
    top_row = int(external._index.search(external.encoder.encode(["query: " + QUERIES[0]]), 1)[1][0][0])
    rows[top_row] = '{"id": "x", "contents": \n'
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(rows), encoding="utf-8")
    offset = sum(len(r.encode("utf-8")) for r in rows[:top_row])
    with pytest.raises(RetrievalError, match=rf"broken.jsonl: row {top_row} \(byte {offset}\) is not a corpus record"):
        DenseRetriever(faiss_file, corpus=broken, encoder=encoder).search(QUERIES[:1], 1)


# ----------------------------------------------------------------------------- Lucene built elsewhere


def _anserini_index(folder: Path, passages, *store_flags: str) -> Path:
    """A Lucene index written by Anserini's own indexer, as a prebuilt one would be (no stepsearch metadata)."""
    from stepsearch.retrieval._lucene import JVM_LOCK, lucene

    args = ["-index", str(folder), "-input", "", "-collection", "JsonCollection", "-threads", "1", *store_flags]
    with JVM_LOCK:
        indexer = lucene().SimpleIndexer(args)
        indexer.addRawDocuments([json.dumps({"id": p.id, "contents": p.contents}) for p in passages])
        indexer.close()
    return folder


def test_prebuilt_style_lucene_folders(corpus, tmp_path, capsys, monkeypatch):
    from stepsearch.retrieval.bm25 import BM25Retriever

    passages = corpus.passages[:200]
    raw_only = _anserini_index(tmp_path / "raw", passages, "-storeRaw")
    retriever = build_retriever(RetrieverConfig(kind="bm25", index=str(raw_only)))
    hit = retriever.search(["Jeff Porcaro drummer"], 1)[0][0]
    source = next(p for p in passages if p.id == hit.id)
    assert (hit.title, hit.text) == (source.title, source.text)  # text recovered from the raw JSON
    slim = _anserini_index(tmp_path / "slim", passages)
    closed = []  # the failed check releases the Lucene reader it opened
    real_close = BM25Retriever.close
    monkeypatch.setattr(BM25Retriever, "close", lambda self: (closed.append(self._searcher), real_close(self))[1])
    with pytest.raises(RetrievalError, match=r"does not store document text \(no 'contents' or 'raw' field\)"):
        BM25Retriever(slim)
    assert len(closed) == 1 and closed[0] is not None
    monkeypatch.undo()
    with pytest.raises(SystemExit) as info:
        main(["index", "build", "--lucene-dir", str(raw_only), "--index", str(tmp_path / "attached"), "--quiet"])
    assert info.value.code == 0 and "bm25 index attached" in capsys.readouterr().out
    meta = read_index_meta(tmp_path / "attached")
    assert (meta.kind, meta.count, meta.lucene_dir) == ("bm25", 200, str(raw_only))
    attached = BM25Retriever(tmp_path / "attached")
    assert [h.id for h in attached.search(["Jeff Porcaro drummer"], 3)[0]] == \
        [h.id for h in retriever.search(["Jeff Porcaro drummer"], 3)[0]]
    err = _error_line(["index", "build", "--lucene-dir", str(slim), "--index", str(tmp_path / "nope"), "--quiet"],
                      capsys)
    assert "does not store document text" in err
    with pytest.raises(RetrievalError, match="not a Lucene index"):
        attach_index(tmp_path / "x", lucene_dir=tmp_path)


@pytest.mark.slow
def test_fit_runs_on_indexes_built_elsewhere(training_env, search_r1_pair, tmp_path):
    """`fit` (one PPO iteration) with ``data.retriever`` pointing at a bare Lucene folder, then at a
    FAISS file + corpus JSONL: the datamodule's RetrieverConfig reaches them with no build step."""
    import subprocess
    import sys

    from training_fixtures import python_env

    faiss_file, corpus = search_r1_pair
    common = ["fit", "--model.model.name_or_path", str(training_env.sft_dir), "--data.train", str(training_env.train),
              "--data.val", str(training_env.val), "--data.batch_size", "2", "--data.max_val_examples", "2",
              "--data.val_batch_size", "2", "--model.rollout.max_turns", "2", "--model.rollout.max_response_tokens", "16",
              "--model.ppo.mini_batch_size", "2", "--model.ppo.micro_batch_size", "2",
              "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"]
    retrievers = {
        "lucene": ["--data.retriever.kind", "bm25", "--data.retriever.index", str(training_env.index_dir / "lucene")],
        "faiss": ["--data.retriever.kind", "dense", "--data.retriever.index", str(faiss_file),
                  "--data.retriever.corpus", str(corpus), "--data.retriever.query_prefix", "query: "],
    }
    env = python_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    for name, flags in retrievers.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        proc = subprocess.run([sys.executable, "-m", "stepsearch", *common, *flags,
                               "--trainer.default_root_dir", str(run_dir / "root")],
                              cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not any(p.name.startswith(".") for p in faiss_file.parent.iterdir() if p.is_dir())  # nothing built there


@pytest.mark.parametrize("block", [1, 3, 7, 64 << 20])
def test_line_offsets_match_a_python_reference_across_block_edges(tmp_path, monkeypatch, block):
    from stepsearch.retrieval import docstore

    rows = ['{"id": "a", "contents": "\\"A\\"\\nx"}', "", '{"id": "b", "text": "é ü"}', "", "", '{"id": "c", "text": "z"}']
    data = ("\n".join(rows) + "\r\n\n" + '{"id": "d", "text": "last, no newline"}').encode("utf-8")
    path = tmp_path / "c.jsonl"
    path.write_bytes(data)
    reference, position = [], 0
    for line in data.split(b"\n"):
        if line.strip():
            reference.append(position)
        position += len(line) + 1
    monkeypatch.setattr(docstore, "OFFSETS_BLOCK", block)
    starts = docstore.scan_line_starts(path)
    assert starts.tolist() == reference
    store = docstore.JsonlRowStore(path, starts)
    assert [store.get(i).id for i in range(len(store))] == ["a", "b", "c", "d"]
    assert (store.get(1).text, store.get(3).text) == ("é ü", "last, no newline")
