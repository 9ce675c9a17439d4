"""The generated multi-hop world: determinism, answerability through golden passages, fictional and
unique names, hop distributions, split hygiene, file layout and the ``data synth`` command."""

from __future__ import annotations

import collections
import json
import re

import pytest

from stepsearch.data.schema import Example
from stepsearch.data.synthetic import (
    WorldConfig,
    generate_world,
    hop_counts,
    normalize_hops,
    read_manifest,
    write_world,
)
from stepsearch.errors import DataError, StepSearchError

SPLITS = ("train", "val", "test")
# Common real-world names of people, places, organisations and works: none may appear in the world.
REAL_NAMES = """Paris London John Mary Smith Berlin Tokyo Rome Oxford Cambridge Google Microsoft Harvard
Titanic Hamlet Moscow France Germany China Amazon Apple James William Elizabeth Madrid Vienna Boston
Sydney Lincoln Washington Peter Anna Maria Chen Kim Lee Brown Johnson Garcia Muller Martin Africa
Europe Asia America India Japan Italy Spain Texas York Jordan Georgia Victoria Alexander Napoleon
Einstein Shakespeare Mozart Beethoven Disney Netflix Oscar Nobel UNESCO Sorbonne Yale Stanford Princeton
Corvette Fennel Ostara Sevara Corrine Sabrine Thetford Orford Bromby Eskdale Solaria Prydain Drossel""".split()


@pytest.fixture(scope="session")
def world():
    """The default (quickstart) world."""
    return generate_world(WorldConfig(seed=0))


def _all_examples(world) -> list[tuple[str, Example]]:
    return [(split, ex) for split in SPLITS for ex in world.split(split)]


def _mention_finder(names):
    """Finds entity names in text, longest name first at each position, on word boundaries."""
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w])({alternation})(?![\w])")
    return lambda text: pattern.findall(text)


def test_same_seed_writes_byte_identical_files(tmp_path):
    config = dict(seed=7, num_people=80, num_orgs=20, num_works=40, num_places=20, num_regions=6,
                  num_countries=3, train_size=300, val_size=60, test_size=60)
    first = write_world(WorldConfig(**config), tmp_path / "a")
    second = write_world(WorldConfig(**config), tmp_path / "b")
    assert set(first) == {"corpus", "train", "val", "test"}
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
        assert first[key].stat().st_size > 0
    assert (tmp_path / "a" / "world.json").read_bytes() == (tmp_path / "b" / "world.json").read_bytes()


def test_separate_processes_write_identical_bytes(tmp_path):
    """Across interpreter runs with different string-hash seeds (no set-order or hash() dependence)."""
    import os
    import subprocess
    import sys

    script = ("import sys; from stepsearch.data.synthetic import WorldConfig, write_world; "
              "write_world(WorldConfig(seed=11, train_size=200, val_size=50, test_size=50), sys.argv[1])")
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, env=env)
    for file in ("corpus.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "world.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_different_seeds_give_different_worlds(world):
    other = generate_world(WorldConfig(seed=1))
    titles = {r["contents"].split("\n")[0] for r in world.corpus}
    other_titles = {r["contents"].split("\n")[0] for r in other.corpus}
    assert len(titles & other_titles) < 0.5 * len(titles)
    questions = {ex.question for ex in world.train}
    assert len(questions & {ex.question for ex in other.train}) < 0.2 * len(questions)


def test_every_question_follows_its_chain_through_golden_passages(world):
    corpus = {row["id"]: row["contents"] for row in world.corpus}
    find = _mention_finder(world.entities)
    for split, ex in _all_examples(world):
        chain = ex.metadata["entities"]
        assert len(chain) == ex.num_hops + 1 == ex.metadata["hops"] + 1
        assert ex.answers[0] == ex.sub_questions[-1].answer == chain[-1]
        assert find(ex.question) == [chain[0]], (ex.question, chain)  # names the start, leaks no hop answer
        subject = chain[0]
        for hop, sq in enumerate(ex.sub_questions):
            assert subject in sq.question
            assert len(sq.golden) == 1
            golden = sq.golden[0]
            assert corpus[golden.id] == f'"{golden.title}"\n{golden.text}'  # verbatim in the corpus
            assert golden.title == subject
            # Reading the golden passage: the one entity it names besides the subject is the answer.
            others = {name for name in find(golden.text) if name != subject}
            assert others == {sq.answer}, (golden.text, sq.answer)
            assert len(sq.search_keys) >= 3
            assert all(subject in key and sq.answer not in key for key in sq.search_keys)
            subject = sq.answer  # the next hop is about this hop's answer
        assert subject == ex.answers[0]


def test_names_are_fictional_unique_and_not_nested(world):
    config = world.config
    real = [e for e in world.entities.values() if not e.distractor]
    expected = (config.num_people + config.num_places + config.num_regions + config.num_countries
                + config.num_orgs + config.num_works)
    assert len(real) == expected  # a name shared by two entities would have merged them
    distractor_facts = [f for f in world.facts if f.distractor]
    assert len(world.entities) - len(real) == len(distractor_facts)
    titles = [row["contents"].split("\n")[0].strip('"') for row in world.corpus]
    assert set(titles) == set(world.entities)
    lowered_real = {n.lower() for n in REAL_NAMES}
    for name in world.entities:
        words = {w.lower() for w in re.findall(r"[A-Za-z]+", name)}
        assert not words & lowered_real, name
    # No entity's name occurs inside another's: passages name entities unambiguously.
    find = _mention_finder(world.entities)
    for name in world.entities:
        assert find(name) == [name], name


def test_distractors_are_lookalikes_of_world_entities(world):
    real_people = [e.name.split() for e in world.entities.values() if e.type == "person" and not e.distractor]
    given = {g for g, _ in real_people}
    family = {f for _, f in real_people}
    fake_people = [e.name.split() for e in world.entities.values() if e.type == "person" and e.distractor]
    assert fake_people
    shared = sum(g in given or f in family for g, f in fake_people)
    assert shared == len(fake_people)
    ratio = sum(f.distractor for f in world.facts) / sum(not f.distractor for f in world.facts)
    assert 0.4 < ratio < 0.6  # distractors_per_fact = 0.5


def test_hop_distribution_follows_config():
    config = WorldConfig(seed=3, train_size=100, val_size=40, test_size=30,
                         train_hops={1: 1, 2: 1}, val_hops={2: 1, 3: 1, 4: 2}, test_hops=[4])
    w = generate_world(config)
    expected = {"train": {1: 50, 2: 50}, "val": {2: 10, 3: 10, 4: 20}, "test": {4: 30}}
    for split in SPLITS:
        hist = collections.Counter(ex.num_hops for ex in w.split(split))
        assert dict(hist) == expected[split]
        assert all(ex.metadata["hops"] == ex.num_hops == len(ex.metadata["relations"]) for ex in w.split(split))


def test_default_world_sizes_and_hops(world):
    assert 1000 <= len(world.corpus) <= 3000
    assert [len(world.split(s)) for s in SPLITS] == [2000, 200, 200]
    assert dict(collections.Counter(ex.num_hops for ex in world.train)) == {1: 700, 2: 900, 3: 300, 4: 100}
    for split in ("val", "test"):
        assert dict(collections.Counter(ex.num_hops for ex in world.split(split))) == {2: 100, 3: 60, 4: 40}


def test_no_question_or_chain_is_shared_across_splits(world):
    seen_questions: dict[str, str] = {}
    seen_chains: dict[tuple, str] = {}
    for split, ex in _all_examples(world):
        chain = (ex.metadata["entities"][0], tuple(ex.metadata["relations"]))
        assert seen_questions.setdefault(ex.question, split + ex.id) == split + ex.id
        assert seen_chains.setdefault(chain, split + ex.id) == split + ex.id


def test_ids_dataset_metadata_and_roundtrip(world):
    for split in SPLITS:
        for i, ex in enumerate(world.split(split)):
            assert ex.id == f"world-0-{split}-{i}"
            assert ex.dataset == "synthetic"
            assert ex.metadata["split"] == split
            assert Example.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex
    person_answers = [ex for _, ex in _all_examples(world) if ex.metadata["entity_types"][-1] == "person"]
    with_alias = [ex for ex in person_answers if len(ex.answers) == 2]
    assert with_alias and all(
        ex.answers[1] == f"{ex.answers[0][0]}. {ex.answers[0].split()[1]}" for ex in with_alias)


def test_corpus_rows_use_the_wiki18_layout(world):
    ids = [row["id"] for row in world.corpus]
    assert len(set(ids)) == len(ids)
    for row in world.corpus:
        assert list(row) == ["id", "contents"]
        title_line, text = row["contents"].split("\n", 1)
        assert title_line.startswith('"') and title_line.endswith('"') and title_line[1:-1] in text


def test_changing_train_size_leaves_corpus_and_held_out_splits(world):
    smaller = generate_world(WorldConfig(seed=0, train_size=500))
    assert smaller.corpus == world.corpus
    assert [ex.to_dict() for ex in smaller.test] == [ex.to_dict() for ex in world.test]
    assert [ex.to_dict() for ex in smaller.val] == [ex.to_dict() for ex in world.val]


def test_write_world_is_idempotent_and_guards_another_world(tmp_path):
    config = WorldConfig(seed=2, train_size=50, val_size=10, test_size=10)
    paths = write_world(config, tmp_path)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert write_world(config, tmp_path) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps  # nothing rewritten
    assert read_manifest(tmp_path)["summary"]["splits"]["train"]["questions"] == 50
    other = WorldConfig(seed=3, train_size=50, val_size=10, test_size=10)
    with pytest.raises(DataError, match="seed"):
        write_world(other, tmp_path)
    write_world(other, tmp_path, overwrite=True)
    assert read_manifest(tmp_path)["config"]["seed"] == 3
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert rows[0]["id"] == "world-3-train-0" and len(rows) == 50


def test_config_validation_and_hop_parsing():
    assert normalize_hops("2:0.5, 3:0.3,4:0.2") == {2: 0.5, 3: 0.3, 4: 0.2}
    assert normalize_hops({"3": 1, 2: 1}) == {2: 1.0, 3: 1.0}
    assert normalize_hops([[1, 2], [4, 1]]) == {1: 2.0, 4: 1.0}
    assert normalize_hops([2, 3]) == {2: 1.0, 3: 1.0}
    assert hop_counts(10, {1: 1, 2: 1, 3: 1}) == {1: 4, 2: 3, 3: 3}
    assert hop_counts(7, {2: 0.5, 3: 0.5}) == {2: 4, 3: 3}
    config = WorldConfig(seed=4, train_hops="1:3,2:1")
    assert WorldConfig(**config.to_json()) == config  # the manifest's form rebuilds the config
    with pytest.raises(StepSearchError, match="1..4"):
        WorldConfig(val_hops={5: 1.0})
    with pytest.raises(StepSearchError, match="hop:weight"):
        WorldConfig(train_hops="two:1")
    with pytest.raises(StepSearchError, match="num_countries <= num_regions"):
        WorldConfig(num_regions=2, num_countries=5)
    with pytest.raises(StepSearchError, match="distinct 4-hop test questions"):
        generate_world(WorldConfig(num_people=2, num_orgs=1, num_works=0, num_places=1, num_regions=1,
                                   num_countries=1, train_size=0, val_size=0, test_size=50, test_hops=[4]))


def test_data_synth_command_writes_and_reports(tmp_path, capsys):
    import argparse

    from stepsearch.data.synthetic import configure_data_synth, run_data_synth

    parser = argparse.ArgumentParser()
    configure_data_synth(parser)
    out = tmp_path / "world"
    argv = ["--seed", "5", "--out", str(out), "--train-size", "40", "--val-size", "10", "--test-size", "10",
            "--train-hops", "1:1,2:1"]
    assert run_data_synth(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "passages" in printed and "written" in printed
    manifest = read_manifest(out)
    assert manifest["config"]["seed"] == 5 and manifest["config"]["train_hops"] == [[1, 1.0], [2, 1.0]]
    assert manifest["config"]["val_hops"] == [[2, 0.5], [3, 0.3], [4, 0.2]]  # default kept
    assert manifest["summary"]["splits"]["train"]["hops"] == {"1": 20, "2": 20}
    assert run_data_synth(parser.parse_args(argv)) == 0
    assert "up to date" in " ".join(capsys.readouterr().out.split())  # rich wraps long temp paths
    with pytest.raises(DataError, match="--overwrite"):  # another world into the same folder
        run_data_synth(parser.parse_args(argv + ["--seed", "6"]))
    assert run_data_synth(parser.parse_args(argv + ["--seed", "6", "--overwrite"])) == 0
    assert read_manifest(out)["config"]["seed"] == 6
