"""Build-once fixtures for the vLLM engine tests: the tests' small generated world with its BM25
index, and a warm-started tiny Qwen2 whose head size (64) vLLM's CPU attention runs (the `model tiny`
default, 16, it rejects). One vLLM engine serves the whole session: it takes ~15 s to start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# hidden 128 / 2 heads: head_dim 64; otherwise the training tests' tiny sizes.
VLLM_TINY = dict(vocab_size=512, hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=256)
# lr 1e-2 (the training tests' warm-start) leaves this wider model writing newlines only.
WARM_START = dict(hops=[1, 2], epochs=15, lr=3e-3, batch_size=8)
TEST_MEMORY_SHARE = 0.02  # of RAM for vLLM's KV cache (~0.5 GB here): 5 people share a 24 GB machine


def vllm_rollout_config(**overrides):
    from training_fixtures import rollout_config

    from stepsearch.rollout.engine import VLLMSettings

    return rollout_config(**{"vllm": VLLMSettings(memory_share=TEST_MEMORY_SHARE), **overrides})


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory):
    """(world paths, retriever, warm-started policy dir) for head size 64."""
    from training_fixtures import WORLD_SIZES, one_thread

    from stepsearch.data.sources import load_examples
    from stepsearch.data.synthetic import WorldConfig, write_world
    from stepsearch.models.tiny import make_tiny_model
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index
    from stepsearch.training.sft import WarmStartSettings, run_warm_start

    root = tmp_path_factory.mktemp("vllm_env")
    with one_thread():
        paths = write_world(WorldConfig(seed=0, **WORLD_SIZES), root / "world")
        index_dir = build_index(paths["corpus"], root / "index_bm25", kind="bm25", show_progress=False)
        retriever = BM25Retriever(index_dir)
        tiny_dir = make_tiny_model(root / "tiny", [str(paths["corpus"]), str(paths["train"])], seed=0, **VLLM_TINY)
        torch.manual_seed(0)
        run_warm_start(str(tiny_dir), root / "sft", load_examples(paths["train"]), retriever, vllm_rollout_config(),
                       WarmStartSettings(**WARM_START))
    yield {"paths": paths, "index_dir": Path(index_dir), "retriever": retriever, "sft_dir": root / "sft"}
    retriever.close()


@pytest.fixture(scope="session")
def vllm_llm(vllm_env):
    """One vLLM ``LLM`` on the warm-started policy for the whole session."""
    from stepsearch.rollout.vllm_engine import build_llm

    return build_llm(str(vllm_env["sft_dir"]), vllm_rollout_config(), torch.float32, seed=0)
