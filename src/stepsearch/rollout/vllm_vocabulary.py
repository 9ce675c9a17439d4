"""vLLM logits processor that keeps padding rows from ever being sampled (``rollout.backend: vllm``).

Qwen2.5 models have 151,936 embedding rows for a tokenizer of 151,665 tokens: the 271 extra rows
map to no token, and vLLM samples over every row of the output layer. :class:`PaddingRowsMask` sets
the logits of ids >= the tokenizer's length to -inf for every request, before sampling and before
vLLM's ``processed_logprobs`` (so greedy decoding never picks them either, and the reported
log-probs are over the tokenizer's ids, as the Hugging Face engine's). One engine-wide processor:
vLLM's per-request ``allowed_token_ids`` would rebuild a 151,936-column mask from a Python list at
every turn of every row (~0.15 s each here). A no-op for models whose rows all are tokens.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor


class PaddingRowsMask(LogitsProcessor):
    """-inf on the logits of ids >= ``len(tokenizer)`` (the tokenizer is the engine's own)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        model_config = vllm_config.model_config
        self.valid_tokens = len(AutoTokenizer.from_pretrained(model_config.tokenizer))
        self.rows = model_config.get_vocab_size()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which id is the largest: applied to greedy requests too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass  # the same for every request

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.valid_tokens < logits.shape[-1]:
            logits[:, self.valid_tokens:] = float("-inf")
        return logits
