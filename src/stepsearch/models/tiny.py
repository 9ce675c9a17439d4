"""A tiny Qwen2-architecture policy made offline: BPE tokenizer trained locally + random weights.

``make_tiny_model`` trains a byte-level BPE (``tokenizers``) on corpus passages and questions, so
entity names split into shared sub-word pieces as they would with a real tokenizer; adds every tag
string (``<think>``, ``</search>``, …) as a single-id, non-special added token (decoded as text, so
stop detection can work by id); builds a ``Qwen2ForCausalLM`` from a config; and writes both with
``save_pretrained`` so the model loads back through the same ``from_pretrained`` path real models
use (:func:`stepsearch.models.loading.load_policy`). Nothing is downloaded.

CLI: ``python -m stepsearch model tiny --out DIR [--corpus FILE ...] [size flags]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from stepsearch.errors import DataError, StepSearchError
from stepsearch.models.loading import load_policy
from stepsearch.rollout.template import INVALID_ACTION_WARNING, LAST_TURN_WARNING, TAGS, TEMPLATES

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TEXT_FIELDS = ("contents", "question", "text")
# ChatML, as Qwen2 instruct models use; optional for tiny models (raw-text prompts are the default).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def iter_corpus_texts(path: str | Path) -> Iterator[str]:
    """Texts of a corpus file: JSONL/JSON records' ``contents``/``question``/``text`` fields, or the
    lines of a plain text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: corpus file not found")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for record in records:
            yield from _record_texts(record)
        return
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                yield from _record_texts(record)
            else:
                yield line


def _record_texts(record) -> Iterator[str]:
    if isinstance(record, dict):
        for field in TEXT_FIELDS:
            value = record.get(field)
            if isinstance(value, str) and value.strip():
                yield value


def _builtin_texts() -> list[str]:
    """Prompt, warning and observation texts, so the instruction words get their own merges."""
    texts = [t.prompt.format(question="Who wrote the novel?") for t in TEMPLATES.values()]
    return texts + [INVALID_ACTION_WARNING, LAST_TURN_WARNING, "Doc 1<## Title: Example ##> text"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, *, add_tag_tokens: bool = True,
                    chat_template: bool = False):
    """Train a byte-level BPE on ``texts``; return a ``PreTrainedTokenizerFast`` with eos/pad set."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    if add_tag_tokens:
        # Non-special: one id each (stop detection by id) but kept by decode(skip_special_tokens=True).
        tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS), clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    corpus_files: list[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    extra_texts: list[str] | None = None,
    add_tag_tokens: bool = True,
    chat_template: bool = False,
) -> Path:
    """Train the tokenizer on the corpus texts (+ ``extra_texts``), build a random-weight
    ``Qwen2ForCausalLM`` and ``save_pretrained`` both into ``out_dir``; returns ``out_dir``.

    ``add_tag_tokens=False`` leaves the tags multi-token (as in real tokenizers), for testing the
    engine's text-based stop detection; ``chat_template=True`` adds a ChatML template.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise StepSearchError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    texts: list[str] = _builtin_texts()
    for file in corpus_files:
        texts.extend(iter_corpus_texts(file))
    texts.extend(extra_texts or [])
    tokenizer = train_tokenizer(texts, vocab_size, add_tag_tokens=add_tag_tokens, chat_template=chat_template)

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --- CLI: python -m stepsearch model tiny -------------------------------------------------------


def configure_model_tiny(parser) -> None:
    parser.add_argument("--out", required=True, help="output directory (config, weights, tokenizer)")
    parser.add_argument(
        "--corpus", action="append", default=[], metavar="FILE",
        help="JSONL/JSON with contents/question/text fields, or plain text; repeatable "
        "(e.g. a corpus.jsonl and a train.jsonl of questions)",
    )
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--max-position-embeddings", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-template", action="store_true", help="add a ChatML chat template")


def run_model_tiny(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line and table say what happens
    console = Console()
    if not args.corpus:
        console.print("[yellow]no --corpus given: the tokenizer is trained on the prompt texts only[/]")
    with console.status("training the BPE tokenizer and building the model…"):
        out = make_tiny_model(
            args.out, args.corpus, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
            num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size, max_position_embeddings=args.max_position_embeddings,
            seed=args.seed, chat_template=args.chat_template,
        )

    model, tokenizer = load_policy(out)
    table = Table(title="tiny model", show_header=False)
    table.add_row("path", str(out))
    table.add_row("architecture", type(model).__name__)
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    table.add_row("vocabulary", f"{len(tokenizer):,}")
    table.add_row("layers / hidden / heads", f"{args.num_layers} / {args.hidden_size} / {args.num_heads}")
    table.add_row("corpus files", ", ".join(args.corpus) or "-")
    console.print(table)
    return 0
