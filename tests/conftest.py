"""Session-wide fixtures: paths to the shared data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPSEARCH_SHARED", REPO.parent / "shared")).resolve()
SHARED_DATA = SHARED / "data"

# Nothing may be fetched from a hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real pretrained parts (SmolLM2, the Qwen2.5 tokenizer, the shared-corpus BM25 index): session fixtures.
from real_models import (  # noqa: E402,F401
    qwen25_base_dir, qwen25_dir, qwen25_tokenizer, real_models_cache, shared_bm25, smollm2_dir,
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}: clone beside ../shared or set STEPSEARCH_SHARED")
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus_path(shared_data: Path) -> Path:
    return shared_data / "corpus" / "multihop_passages.jsonl"


@pytest.fixture(scope="session")
def raw_dir(shared_data: Path) -> Path:
    return shared_data / "raw"
