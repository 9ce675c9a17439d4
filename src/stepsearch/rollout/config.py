"""Rollout settings: :class:`RolloutConfig` (the turn loop's limits, prompt, sampling and backend)
and :class:`VLLMSettings` (what only the vLLM backend reads). Defaults are the paper's (METHOD.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepsearch.errors import StepSearchError
from stepsearch.rollout import template as tpl


@dataclass
class VLLMSettings:
    """Settings only the vLLM backend reads (``rollout.vllm.*``, with ``rollout.backend: vllm``)."""

    memory_share: float = 0.1  # GPU: vLLM's gpu_memory_utilization; CPU: share of RAM reserved for the KV cache
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    sleep: bool = False  # GPU: free vLLM's weights and KV cache between rollouts (sleep/wake)

    def __post_init__(self) -> None:
        if not 0 < self.memory_share < 1:
            raise StepSearchError(f"rollout config: vllm.memory_share must be in (0, 1), got {self.memory_share}")


@dataclass
class RolloutConfig:
    """Rollout settings (defaults: the paper's). Token limits are per turn, except the context cap.

    Backend-specific settings live in the backend's own dataclass (``vllm``); trainer settings are the
    trainer's (truncated importance sampling: ``model.ppo.tis_cap``)."""

    max_turns: int = 5
    max_response_tokens: int = 800  # per generation turn
    max_observation_tokens: int = 800  # per <information> block
    max_context_tokens: int = 4096  # prompt + response
    top_k: int = 3  # documents per search
    template: str = "think"  # "think" or "plan" (stepsearch.rollout.template.TEMPLATES)
    observation_format: str = "stepsearch"  # or "search-r1": the released layouts (rollout.template)
    use_chat_template: bool | None = None  # None: when the tokenizer has one
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int | None = None  # default seed of generate(); None draws a fresh one
    backend: str = "hf"  # "hf": the training model itself | "vllm": a colocated vLLM engine (README "vLLM")
    independent_turns: bool = True  # per-row turn loops where the backend batches continuously (vllm)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    # Report each policy token's sampling log-prob (Trajectory.rollout_logprobs; vLLM always does). The
    # trainer turns it on for truncated importance sampling (model.ppo.tis_cap).
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.vllm, dict):  # from a policy card (asdict) or a plain mapping
            self.vllm = VLLMSettings(**self.vllm)
        checks = [
            (self.max_turns >= 0, "max_turns must be >= 0"),
            (self.max_response_tokens >= 1, "max_response_tokens must be >= 1"),
            (self.max_observation_tokens >= 1, "max_observation_tokens must be >= 1"),
            (self.max_context_tokens >= 1, "max_context_tokens must be >= 1"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise StepSearchError(f"rollout config: {message}")
        tpl.get_template(self.template)
        tpl.check_observation_format(self.observation_format)


BACKENDS = ("hf", "vllm")
