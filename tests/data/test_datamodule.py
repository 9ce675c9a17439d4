"""StepSearchDataModule: splits, loaders (ordering, batching), the synthetic world and the retriever."""

from __future__ import annotations

import os
import pickle

import pytest

from stepsearch.data.datamodule import StepSearchDataModule, collate_examples
from stepsearch.data.schema import Example
from stepsearch.data.synthetic import WorldConfig
from stepsearch.errors import StepSearchError
from stepsearch.retrieval.factory import RetrieverConfig

MUSIQUE = "musique_ans_dev_sample.jsonl"
SMALL_WORLD = dict(num_people=30, num_places=12, num_regions=4, num_countries=2, num_orgs=8, num_works=12, train_size=40, val_size=10, test_size=10)


def ids(batches) -> list[str]:
    return [ex.id for batch in batches for ex in batch]


def test_seeded_val_split_and_loaders(raw_dir):
    dm = StepSearchDataModule(train=str(raw_dir / MUSIQUE), val_fraction=0.2, batch_size=8, val_batch_size=16, seed=3)
    dm.setup("fit")
    assert (len(dm.train_examples), len(dm.val_examples)) == (120, 30)
    assert not {e.id for e in dm.train_examples} & {e.id for e in dm.val_examples}
    again = StepSearchDataModule(train=str(raw_dir / MUSIQUE), val_fraction=0.2, seed=3)
    again.setup("fit")
    assert [e.id for e in again.val_examples] == [e.id for e in dm.val_examples]
    other = StepSearchDataModule(train=str(raw_dir / MUSIQUE), val_fraction=0.2, seed=4)
    other.setup("fit")
    assert [e.id for e in other.val_examples] != [e.id for e in dm.val_examples]

    val_batches = list(dm.val_dataloader())
    assert [len(b) for b in val_batches] == [16, 14]  # last partial batch kept
    assert ids(val_batches) == [e.id for e in dm.val_examples] == ids(dm.val_dataloader())  # never shuffled
    batch = val_batches[0]
    assert isinstance(batch, list) and all(isinstance(e, Example) for e in batch)

    train_batches = list(dm.train_dataloader())
    assert sum(len(b) for b in train_batches) == 120 and len(train_batches) == 15
    order = ids(train_batches)
    assert sorted(order) == sorted(e.id for e in dm.train_examples)
    assert order != [e.id for e in dm.train_examples]  # shuffled
    assert ids(again.train_dataloader()) == order  # same seed, same order


def test_concatenated_files_limits_and_test_loader(raw_dir):
    dm = StepSearchDataModule(test=[str(raw_dir / "bamboogle_test.jsonl"), str(raw_dir / "nq_test_sample.jsonl")], max_test_examples=130, val_batch_size=50)
    dm.setup("test")
    assert len(dm.test_examples) == 130
    assert dm.test_examples[124].dataset == "bamboogle" and dm.test_examples[125].dataset == "nq"
    assert [len(b) for b in dm.test_dataloader()] == [50, 50, 30]
    assert dm.val_dataloader() == []  # no validation configured: Lightning skips it
    with pytest.raises(StepSearchError, match="no train examples"):
        dm.train_dataloader()
    with pytest.raises(StepSearchError, match="no retriever configured"):
        _ = dm.retriever


def test_invalid_arguments():
    with pytest.raises(StepSearchError, match="either val"):
        StepSearchDataModule(train="a.jsonl", val="b.jsonl", val_fraction=0.1)
    with pytest.raises(StepSearchError, match="val_fraction"):
        StepSearchDataModule(val_fraction=1.5)


def test_collate_is_picklable():
    restored = pickle.loads(pickle.dumps(collate_examples))
    ex = Example("a", "q?", ["x"])
    assert restored([ex]) == [ex]


@pytest.fixture(scope="module")
def world_module(tmp_path_factory):
    world_dir = tmp_path_factory.mktemp("world")
    dm = StepSearchDataModule(world=WorldConfig(**SMALL_WORLD), world_dir=str(world_dir), batch_size=4)
    dm.prepare_data()
    return dm, world_dir


def test_world_files_are_the_default_splits(world_module):
    dm, world_dir = world_module
    files = {name: world_dir / f"{name}.jsonl" for name in ("corpus", "train", "val", "test")}
    assert all(p.is_file() for p in files.values())
    mtimes = {n: os.stat(p).st_mtime_ns for n, p in files.items()}
    dm.prepare_data()  # idempotent: nothing rewritten
    assert {n: os.stat(p).st_mtime_ns for n, p in files.items()} == mtimes
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_examples), len(dm.val_examples), len(dm.test_examples)) == (40, 10, 10)
    assert dm.split_files("train") == [str(files["train"])]


def test_world_retriever_is_bm25_over_the_world_corpus(world_module):
    dm, world_dir = world_module
    config = dm.resolved_retriever_config()
    assert (config.kind, config.index, config.corpus) == ("bm25", str(world_dir / "index_bm25"), str(world_dir / "corpus.jsonl"))
    assert (world_dir / "index_bm25").is_dir()  # built by prepare_data
    assert dm.retriever is dm.retriever  # built once
    dm.setup("fit")
    sq = next(sq for ex in dm.train_examples for sq in ex.sub_questions if sq.golden and sq.search_keys)
    (hits,) = dm.retriever.search([sq.search_keys[0]], 5)
    assert sq.golden[0].id in {p.id for p in hits}
    state = dm.__getstate__()
    assert state["_retriever"] is None  # never pickled


def test_explicit_retriever_config_gets_world_defaults(tmp_path):
    dm = StepSearchDataModule(world=WorldConfig(**SMALL_WORLD), world_dir=str(tmp_path / "w"), retriever=RetrieverConfig(kind="bm25", threads=1))
    config = dm.resolved_retriever_config()
    assert config.threads == 1 and config.index == str(tmp_path / "w" / "index_bm25")
    assert config.corpus == str(tmp_path / "w" / "corpus.jsonl")
    http = StepSearchDataModule(world=WorldConfig(**SMALL_WORLD), retriever=RetrieverConfig(kind="http", url="http://x:1"))
    assert http.resolved_retriever_config().corpus is None


def test_lightning_cli_can_build_it_from_yaml(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(StepSearchDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  train: [a.jsonl, b.jsonl]\n  val_fraction: 0.1\n  world:\n    train_size: 10\n  retriever:\n    kind: bm25\n    index: idx\n"
    )
    init = parser.instantiate_classes(cfg)
    assert init.data.train_files == ["a.jsonl", "b.jsonl"]
    assert init.data.world.train_size == 10 and init.data.retriever_config.index == "idx"


def test_rollouts_are_served_with_the_current_policy(tmp_path):
    """The DataModule owns the engine and rolls out on request only: loaders yield questions (so
    Lightning's prefetch never holds a stale rollout), and a rollout after an in-place update uses
    the updated weights."""
    import torch

    from stepsearch.models.loading import load_policy
    from stepsearch.models.tiny import make_tiny_model
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.engine import RolloutConfig

    dm = StepSearchDataModule(world=WorldConfig(seed=0, **SMALL_WORLD), world_dir=str(tmp_path / "world"), batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    examples = dm.train_examples[:3]
    with pytest.raises(StepSearchError, match="attach_policy"):
        dm.rollout(examples)
    tiny = make_tiny_model(tmp_path / "tiny", [str(tmp_path / "world" / "corpus.jsonl")], hidden_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, intermediate_size=64)
    model, tokenizer = load_policy(tiny, device="cpu")
    config = RolloutConfig(max_turns=1, max_response_tokens=12, max_context_tokens=512, template="compact")
    dm.attach_policy(model, tokenizer, config)
    engine = dm.rollouts
    dm.attach_policy(model, tokenizer, config)
    assert dm.rollouts is engine  # same policy and settings: the engine is kept

    calls = []
    generate = engine.generate
    engine.generate = lambda *args, **kwargs: calls.append(args) or generate(*args, **kwargs)
    batches = list(dm.train_dataloader())
    assert calls == [] and all(isinstance(ex, Example) for batch in batches for ex in batch)

    before = dm.rollout(examples, greedy=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    dm.policy_updated()
    after = dm.rollout(examples, greedy=True)
    fresh = HFRolloutEngine(model, tokenizer, dm.retriever, config).generate([ex.question for ex in examples], greedy=True)
    assert len(calls) == 2
    assert torch.equal(after.input_ids, fresh.input_ids)
    assert not (before.input_ids.shape == after.input_ids.shape and torch.equal(before.input_ids, after.input_ids))
    assert pickle.loads(pickle.dumps(dm))._engine is None  # an engine (and its model) never crosses processes
