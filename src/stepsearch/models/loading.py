"""Loading a policy (causal LM + tokenizer) by Hugging Face name or local path.

One path for every model: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``, so the tiny
offline model (:mod:`stepsearch.models.tiny`) exercises the same code as Qwen2.5-3B. When
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, nothing is fetched (``local_files_only``)
and a hub name missing from the local cache raises one clear :class:`StepSearchError`. A ``.gguf``
file is refused with the command that converts it once (``python -m stepsearch model convert``;
why: :mod:`stepsearch.models.pretrained`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from stepsearch.errors import StepSearchError

DTYPES = {
    "float32": "float32", "fp32": "float32", "32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16",
    "float16": "float16", "fp16": "float16", "16": "float16", "16-mixed": "float16",
    "auto": "auto",
}  # fmt: skip


def hub_offline() -> bool:
    """True when the environment forbids hub downloads."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_dtype(dtype):
    """A ``torch.dtype`` (or "auto") from a name such as "bf16", "bfloat16", "float32"."""
    import torch

    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype or torch.float32
    name = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise StepSearchError(f"unknown dtype {dtype!r}: use one of {sorted(set(DTYPES.values()))}")
    return name if name == "auto" else getattr(torch, name)


def _source_kwargs(name_or_path: str | Path) -> dict:
    local = Path(name_or_path).expanduser()
    if local.suffix.lower() == ".gguf":
        raise StepSearchError(f"{local}: a GGUF file is not loaded directly; convert it once into a Hugging Face "
                              f"folder (`python -m stepsearch model convert --gguf {local} --out DIR`) and pass DIR")
    if local.exists():
        if not (local / "config.json").is_file() and not (local / "tokenizer_config.json").is_file():
            raise StepSearchError(f"{local}: not a model directory (no config.json or tokenizer_config.json)")
        return {}
    return {"local_files_only": True} if hub_offline() else {}


def _fetch_error(name_or_path, what: str, err: Exception) -> StepSearchError:
    if Path(str(name_or_path)).expanduser().exists():
        return StepSearchError(f"{name_or_path}: cannot load the {what}: {str(err).splitlines()[0]}")
    if hub_offline():
        return StepSearchError(
            f"model {str(name_or_path)!r} is not a local directory and not in the Hugging Face cache, and "
            "HF_HUB_OFFLINE is set: download it first (`huggingface-cli download NAME`) or pass a local path"
        )
    return StepSearchError(f"cannot fetch the {what} {str(name_or_path)!r} from the Hugging Face hub: "
                           f"{str(err).splitlines()[0]}")


def load_tokenizer(name_or_path: str | Path, **kwargs):
    """``AutoTokenizer.from_pretrained`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **_source_kwargs(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise _fetch_error(name_or_path, "tokenizer", err) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StepSearchError(f"{name_or_path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str | Path,
    dtype="float32",
    device=None,
    gradient_checkpointing: bool = False,
    trunk_only: bool = False,
    **kwargs,
):
    """Load ``(model, tokenizer)``: the causal LM in ``dtype`` on ``device`` (default: CUDA when
    available, else CPU), in eval mode, with ``pad_token_id`` set in its configs. Extra keyword
    arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    ``trunk_only``: the transformer without its LM head (``AutoModel``), e.g. a critic's trunk."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    model_class = AutoModel if trunk_only else AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    # transformers >= 4.56 calls it `dtype`; older versions `torch_dtype`.
    params = inspect.signature(model_class.from_pretrained).parameters
    dtype_key = "dtype" if "dtype" in params or _transformers_major() >= 5 else "torch_dtype"
    try:
        model = model_class.from_pretrained(
            str(name_or_path), **{dtype_key: torch_dtype}, **_source_kwargs(name_or_path), **kwargs
        )
    except (OSError, ValueError) as err:
        raise _fetch_error(name_or_path, "model", err) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return model, tokenizer


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
