"""The quickstart bootstrap: make the tiny model and warm-start it, each once per settings.

Each product carries a fingerprint of what made it (``stepsearch_fingerprint.json``, see
:mod:`stepsearch.records.runs`): a directory made by other settings is refused in one line naming them,
never silently reused. The training itself lives in :mod:`stepsearch.training.sft`.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from stepsearch.models.pretrained import cached_build, convert_gguf, pretrained_source
from stepsearch.training.sft import (
    BootstrapSettings,
    PretrainedSettings,
    TinyModelSettings,
    WarmStartSettings,
    run_warm_start,
)
from stepsearch.data.sources import load_examples
from stepsearch.errors import StepSearchError
from stepsearch.models.tiny import make_tiny_model
from stepsearch.progress import step


# Rollout settings that shape a demonstration's tokens (sampling settings do not: it is scripted).
DEMONSTRATION_ROLLOUT_FIELDS = ("template", "max_turns", "max_response_tokens", "max_observation_tokens",
                                "max_context_tokens", "top_k", "use_chat_template", "observation_format")
# Retriever settings that change which passages fill demonstrations (threads, cache, HTTP timeouts and
# retries, mmap, faiss_gpu only change how fast or how robustly the same passages come back). The index
# build fields count: with `corpus` set and no index yet, the index is built here from them.
DEMONSTRATION_RETRIEVER_FIELDS = ("kind", "index", "url", "corpus", "encoder", "query_prefix", "passage_prefix",
                                  "pooling", "bm25_k1", "bm25_b", "faiss_index", "faiss_nlist", "faiss_pq_m",
                                  "faiss_rerank", "rerank_candidates", "nprobe", "ef_search")


def tiny_fingerprint_settings(tiny: TinyModelSettings) -> dict:
    """What makes the tiny model: its settings (not where it is written) and its corpus files' bytes."""
    from dataclasses import asdict

    from stepsearch.records.runs import file_digest  # lazy: loads lightning, torch, transformers

    settings = {k: v for k, v in asdict(tiny).items() if k != "out_dir"}
    settings["corpus_files"] = {str(f): file_digest(f) for f in tiny.corpus_files}
    return settings


def warm_start_fingerprint_settings(warm: WarmStartSettings, base: str, rollout_config, datamodule) -> dict:
    """What makes the warm-start: its settings and data, the base model's fingerprint, the rollout
    settings that shape demonstrations, and the retriever that fills their observations."""
    import dataclasses

    from stepsearch.records.runs import FINGERPRINT_FILE, file_digest, read_fingerprint  # lazy: loads lightning, torch, transformers

    base_print = Path(base) / FINGERPRINT_FILE
    settings = {k: v for k, v in dataclasses.asdict(warm).items() if k != "data"}
    settings["data"] = {str(f): file_digest(f) for f in warm.data}
    settings["base"] = read_fingerprint(base_print)["fingerprint"] if base_print.exists() else str(base)
    settings["rollout"] = {k: getattr(rollout_config, k, None) for k in DEMONSTRATION_ROLLOUT_FIELDS}
    retriever = datamodule.resolved_retriever_config() if hasattr(datamodule, "resolved_retriever_config") else None
    settings["retriever"] = (demonstration_retriever_settings(dataclasses.asdict(retriever))
                             if dataclasses.is_dataclass(retriever) else str(retriever))
    return settings


def demonstration_retriever_settings(retriever: dict) -> dict:
    """The fields of a retriever config (as a dict) that shape demonstrations."""
    return {k: retriever.get(k) for k in DEMONSTRATION_RETRIEVER_FIELDS}


def upgrade_warm_start_settings(stored: dict) -> dict:
    """A warm-start fingerprint written before the retriever whitelist (the whole config) in today's form."""
    retriever = stored.get("retriever")
    if isinstance(retriever, dict):
        return {**stored, "retriever": demonstration_retriever_settings(retriever)}
    return stored


def run_bootstrap(settings: BootstrapSettings, policy_path: str, rollout_config, datamodule) -> None:
    """Make the tiny model and warm-start it, each only if not made yet by the same settings.

    A fingerprint of the settings that made each (``stepsearch_fingerprint.json``) is stored beside
    it; a directory made by other settings is refused in one line naming them (never silently reused:
    the run would record settings that did not make its policy); a policy directory the warm-start
    did not make (no ``warm_start.json``: an exported policy) is used as it is. The global RNG states are left as
    they were, so a run trains the same whether its bootstrap was made now or cached.
    """
    import torch

    from stepsearch.records.runs import check_fingerprint, write_fingerprint  # lazy: loads lightning, torch, transformers

    with torch.random.fork_rng(devices=[]), _python_rng_kept():
        if settings.pretrained is not None:
            make_pretrained(settings.pretrained)
        if settings.tiny is not None:
            t = settings.tiny
            tiny_settings = tiny_fingerprint_settings(t)
            if not check_fingerprint(t.out_dir, tiny_settings, "tiny model", "model.bootstrap.tiny.out_dir"):
                with step(f"tiny model: training its tokenizer and writing {t.out_dir}"):
                    make_tiny_model(t.out_dir, list(t.corpus_files), vocab_size=t.vocab_size,
                                    hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                                    num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size, seed=t.seed)
                write_fingerprint(t.out_dir, tiny_settings, "tiny model")
        warm = settings.warm_start
        policy = Path(policy_path)
        if warm is not None and (policy / "config.json").exists() and not (policy / "warm_start.json").exists():
            warm = None  # a model the warm-start did not make (e.g. an exported policy): used as it is
        if warm is not None:
            base = warm.base or (settings.tiny.out_dir if settings.tiny else None)
            if base is None:
                raise StepSearchError("bootstrap.warm_start needs `base` (or bootstrap.tiny) to start from")
            warm_settings = warm_start_fingerprint_settings(warm, base, rollout_config, datamodule)
            if not check_fingerprint(policy_path, warm_settings, "warm-started policy", "model.model.name_or_path",
                                     upgrade=upgrade_warm_start_settings):
                examples = [ex for path in warm.data for ex in load_examples(path)]
                run_warm_start(base, policy_path, examples, datamodule.retriever, rollout_config, warm)
                write_fingerprint(policy_path, warm_settings, "warm-started policy")


def make_pretrained(settings: PretrainedSettings) -> Path:
    """Convert ``settings.gguf`` into ``settings.out_dir`` unless it already holds that conversion."""
    source, gguf_path = pretrained_source(settings.gguf)
    with step(f"pretrained model: converting {gguf_path.name} into {settings.out_dir}"):
        return cached_build(settings.out_dir, source, lambda tmp: convert_gguf(gguf_path, tmp))


@contextlib.contextmanager
def _python_rng_kept():
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)
