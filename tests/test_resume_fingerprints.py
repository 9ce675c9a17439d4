"""Fingerprints of cached bootstrap artefacts: corrupt files are one error line; the warm-start's
retriever part keeps only the settings that change demonstrations (old full-config prints still match)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.retrieval.factory import RetrieverConfig
from stepsearch.records.runs import FINGERPRINT_FILE, check_fingerprint, write_fingerprint
from stepsearch.training.bootstrap import upgrade_warm_start_settings, warm_start_fingerprint_settings
from stepsearch.training.sft import WarmStartSettings


def _artefact(folder, fingerprint_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    if fingerprint_text is not None:
        (folder / FINGERPRINT_FILE).write_text(fingerprint_text)
    return folder


@pytest.mark.parametrize("text,message", [
    ('{"fingerprint": "ab", "settings": {', "unreadable fingerprint (JSONDecodeError"),
    ("[1, 2]", "not a fingerprint record"),
    ('{"settings": {}}', "not a fingerprint record"),
])
def test_corrupt_fingerprint_is_one_line_naming_the_file(tmp_path, text, message):
    out = _artefact(tmp_path / "tiny", text)
    with pytest.raises(StepSearchError) as info:
        check_fingerprint(out, {"a": 1}, "tiny model", "model.bootstrap.tiny.out_dir")
    assert str(info.value).startswith(f"{out / FINGERPRINT_FILE}: ") and message in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    # The warm-start reads its base model's print too: the same error, not a KeyError / JSONDecodeError.
    warm = WarmStartSettings(data=[])
    with pytest.raises(StepSearchError, match=message.replace("(", r"\(")):
        warm_start_fingerprint_settings(warm, str(out), SimpleNamespace(), SimpleNamespace())


def _datamodule(**retriever):
    config = RetrieverConfig(kind="bm25", index="/indexes/wiki", **retriever)
    return SimpleNamespace(resolved_retriever_config=lambda: config)


def test_warm_start_print_ignores_retriever_speed_settings(tmp_path):
    warm, base, rollout = WarmStartSettings(data=[]), str(tmp_path / "base"), SimpleNamespace(top_k=3)
    plain = warm_start_fingerprint_settings(warm, base, rollout, _datamodule())
    faster = warm_start_fingerprint_settings(warm, base, rollout, _datamodule(
        threads=16, cache_size=4096, timeout_s=5.0, max_retries=9, backoff_s=0.1, mmap=True, faiss_gpu=True))
    assert faster == plain
    for change in ({"bm25_k1": 1.2}, {"nprobe": 64}, {"query_prefix": "q: "}, {"encoder": "other"}):
        assert warm_start_fingerprint_settings(warm, base, rollout, _datamodule(**change)) != plain, change

    policy = _artefact(tmp_path / "policy")
    write_fingerprint(policy, plain, "warm-started policy")
    assert check_fingerprint(policy, faster, "warm-started policy", "model.model.name_or_path")
    with pytest.raises(StepSearchError, match=r"changed: retriever\.bm25_b"):
        check_fingerprint(policy, warm_start_fingerprint_settings(warm, base, rollout, _datamodule(bm25_b=0.7)),
                          "warm-started policy", "model.model.name_or_path")


def test_a_print_written_with_the_whole_retriever_config_still_matches(tmp_path):
    warm, base, rollout = WarmStartSettings(data=[]), str(tmp_path / "base"), SimpleNamespace(top_k=3)
    today = warm_start_fingerprint_settings(warm, base, rollout, _datamodule(threads=8))
    old = {**today, "retriever": dataclasses.asdict(_datamodule(threads=2).resolved_retriever_config())}
    policy = _artefact(tmp_path / "policy")
    write_fingerprint(policy, old, "warm-started policy")
    assert json.loads((policy / FINGERPRINT_FILE).read_text())["settings"]["retriever"]["threads"] == 2
    with pytest.raises(StepSearchError, match="made with other settings"):  # without the upgrade: refused
        check_fingerprint(policy, today, "warm-started policy", "model.model.name_or_path")
    assert check_fingerprint(policy, today, "warm-started policy", "model.model.name_or_path",
                             upgrade=upgrade_warm_start_settings)
