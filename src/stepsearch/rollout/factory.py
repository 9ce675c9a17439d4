"""The rollout engine a config names: one factory for training, validation, ``evaluate`` and ``ask``.

The backends subclass :class:`stepsearch.rollout.engine.TurnLoopEngine`, so ``engine`` cannot import
them; this module sits above both. vLLM is imported on demand: it is heavy and optional.
"""

from __future__ import annotations

from stepsearch.retrieval.base import Retriever
from stepsearch.rollout.engine import RolloutConfig, TurnLoopEngine
from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.vllm_engine import VLLMRolloutEngine


def build_engine(config: RolloutConfig, model, tokenizer, retriever: Retriever, *,
                 model_path: str | None = None) -> TurnLoopEngine:
    """The rollout engine ``config.backend`` names, generating with ``model`` (the live policy).

    ``vllm`` loads ``model_path`` (the policy's Hugging Face directory, for the architecture) into a
    colocated vLLM engine and syncs ``model``'s weights into it before its first rollout and after
    every :meth:`TurnLoopEngine.policy_updated`.
    """
    if config.backend == "vllm":
        return VLLMRolloutEngine.from_policy(model, tokenizer, retriever, config, model_path=model_path)
    return HFRolloutEngine(model, tokenizer, retriever, config)
