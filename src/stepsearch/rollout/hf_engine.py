"""The Hugging Face rollout backend (``rollout.backend: hf``): the turn loop of
:mod:`stepsearch.rollout.engine` decoded by the training model itself, batched with a KV cache kept
across turns (:class:`~stepsearch.rollout.decoding.DecodeSession`), each row sampling from its own
seeded stream (:class:`~stepsearch.rollout.seeding.RowStreams`)."""

from __future__ import annotations

import torch

from stepsearch.retrieval.base import Retriever
from stepsearch.rollout.decoding import DecodeSession, ForwardAdapter, StopRule
from stepsearch.rollout.engine import RolloutConfig, TurnLoopEngine, eos_token_ids
from stepsearch.rollout.seeding import RowStreams


class HFRolloutEngine(TurnLoopEngine):
    """The turn loop on a Hugging Face causal LM: batched KV-cache decoding with left padding.

    Holds a reference to ``model`` (PPO updates it in place between calls); runs it in eval mode
    under ``no_grad`` and restores its train/eval mode afterwards.
    """

    def __init__(self, model, tokenizer, retriever: Retriever, config: RolloutConfig | None = None):
        super().__init__(tokenizer, retriever, config)
        self.model = model
        self._forward = ForwardAdapter(model)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        self._stop = StopRule(tokenizer, eos_token_ids(model, tokenizer), max(vocab, len(tokenizer)))
        self._was_training = False

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            return device
        tensor = next(self.model.parameters(), None)
        tensor = tensor if tensor is not None else next(self.model.buffers(), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _begin(self, seed, greedy):
        device = self.device
        self._stop.to(device)
        self._was_training = self.model.training
        self.model.eval()
        cfg = self.config
        streams = None if greedy else RowStreams(self.row_seeds, device)
        self._session = DecodeSession(self._forward, self._stop, pad_id=self.pad_id, device=device, greedy=greedy,
                                      temperature=cfg.temperature, top_p=cfg.top_p, streams=streams,
                                      logprobs=cfg.return_logprobs, valid_tokens=len(self.tokenizer))

    def _end(self):
        self._session = None  # frees the KV cache
        self.model.train(self._was_training)

    def _generate_turn(self, keys, contexts, max_new, greedy):
        with torch.no_grad():
            return self._session.run_turn(keys, contexts, max_new)
