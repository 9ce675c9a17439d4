"""Peak memory of PPO scoring and update: full-vocabulary logits (before) vs lean log-probs (after),
and a per-GPU memory plan for the 3B/7B recipes by calculation.

    python benchmarks/memory.py                 # measured table (CPU RSS or CUDA peak) + the plan
    python benchmarks/memory.py --plan          # the 3B/7B plan only (no measurement)

Measured: a small Qwen2 trunk (hidden 256, 2 layers, float32) with Qwen2.5's vocabulary (151,936,
tied embeddings) on rows of a 2,048-token context, 25% of them policy tokens (the rest prompt and
``<information>``, as in real trajectories), temperature 0.6. "before" is the previous code path:
``model(...).logits`` for every position, ``.float() / T`` (a second full copy), log-softmax over
all positions (and, in the update, entropy over all positions); "after" is ``models.policy.TokenScorer``: hidden states at policy tokens
only, LM head + log-softmax in chunks of 1,024 positions under activation checkpointing, entropy
detached. Each cell runs in its own process; on CPU the number is the growth of peak RSS over the
process after model construction (``ru_maxrss``), on CUDA ``max_memory_allocated`` growth.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

VOCAB, CONTEXT, POLICY_FRACTION, TEMPERATURE = 151_936, 2048, 0.25, 0.6


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cell(variant: str, phase: str, rows: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stepsearch.models.policy import TokenScorer, scatter_rows
    from stepsearch.ppo import core

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=CONTEXT)
    model = Qwen2ForCausalLM(config).to(device)
    ids = torch.randint(0, VOCAB, (rows, CONTEXT), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros(rows, CONTEXT - 1, dtype=torch.bool, device=device)
    for start in range(256, CONTEXT - 1, 512):  # blocks of 128 policy tokens between observations
        mask[:, start:start + int(512 * POLICY_FRACTION)] = True
    scorer = TokenScorer(model, chunk_tokens=1024)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_bytes(device)
    grad = phase == "update"
    with torch.set_grad_enabled(grad):
        if variant == "before":
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
            scaled = logits.float() / TEMPERATURE
            logp = core.logprobs_from_logits(scaled, ids[:, 1:])
            # the old scoring pass took no entropy; its update took it over every position
            entropy = core.masked_mean(core.entropy_from_logits(scaled), mask) if grad else logp.new_zeros(())
        else:
            flat, ent, _ = scorer(ids, attn, mask, TEMPERATURE, entropy="detached")
            logp = scatter_rows(flat, mask)
            entropy = ent.mean()
        if grad:
            loss = core.masked_mean(-logp, mask) - 0.0 * entropy
            loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"variant": variant, "phase": phase, "rows": rows, "device": device.type,
            "peak_mib": (_peak_bytes(device) - base) / 2**20}


def measure(rows: int) -> list[dict]:
    out = []
    for phase in ("scoring", "update"):
        for variant in ("before", "after"):
            proc = subprocess.run([sys.executable, __file__, "--cell", variant, phase, str(rows)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------- the 3B/7B plan

MODELS = {  # Qwen2.5 shapes (config.json): params, layers, hidden, intermediate, kv heads, head dim
    "Qwen2.5-3B": dict(params=3.09e9, trunk=3.09e9, layers=36, hidden=2048, inter=11008, kv=2, head=128),
    "Qwen2.5-7B": dict(params=7.62e9, trunk=7.07e9, layers=28, hidden=3584, inter=18944, kv=4, head=128),
}


def plan(name: str, gpus: int, micro: int, rollouts_per_gpu: int, context: int = 4096) -> dict:
    """GiB per GPU under FSDP2 (fp32 master weights + grads + AdamW m, v: 16 B/param, sharded),
    bf16 reference (sharded), activations with checkpointing (bf16 layer inputs kept for every
    layer + one layer recomputed, ~(34 + 3·inter/hidden)·s·b·h bytes with flash/SDPA attention),
    one LM-head chunk (1,024 × vocab × fp32 × 3 temporaries), and for generation the gathered bf16
    policy + KV cache (2 · layers · kv · head · 2 B per token) of this GPU's rollouts."""
    m, gib = MODELS[name], 2**30
    tokens = micro * context
    actor = 16 * m["params"] / gpus / gib
    critic = 16 * m["trunk"] / gpus / gib
    reference = 2 * m["params"] / gpus / gib
    kept = 2 * tokens * m["hidden"] * m["layers"] / gib
    layer = (34 + 3 * m["inter"] / m["hidden"]) * tokens * m["hidden"] / gib
    head = 3 * 1024 * VOCAB * 4 / gib
    activations = kept + layer + head
    full_policy = 2 * m["params"] / gib
    kv = 2 * m["layers"] * m["kv"] * m["head"] * 2 * rollouts_per_gpu * context / gib
    train_peak = actor + critic + reference + activations
    gen_peak = actor + critic + reference + full_policy + kv
    logits_before = micro * context * VOCAB * 4 / gib
    return dict(model=name, gpus=gpus, micro=micro, actor=actor, critic=critic, reference=reference,
                activations=activations, generation=full_policy + kv, kv=kv, train_peak=train_peak,
                gen_peak=gen_peak, logits_before=logits_before,
                ddp=(16 * (m["params"] + m["trunk"]) + 2 * m["params"]) / gib + activations)


def print_plan() -> None:
    rows = [plan("Qwen2.5-3B", 8, 16, 16), plan("Qwen2.5-7B", 8, 8, 16)]
    print("| model (8 x 80 GB, FSDP2) | actor fp32+grad+Adam | critic | reference bf16 | activations (micro, 4k) "
          "| generation (bf16 policy + KV) | peak train | peak rollout | DDP per GPU | full logits, old path |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['actor']:.1f} | {r['critic']:.1f} | {r['reference']:.1f} | "
              f"{r['activations']:.1f} (micro {r['micro']}) | {r['generation']:.1f} (KV {r['kv']:.1f}) | "
              f"{r['train_peak']:.1f} | {r['gen_peak']:.1f} | {r['ddp']:.0f} | {r['logits_before']:.0f} per copy |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print only the 3B/7B plan")
    parser.add_argument("--rows", type=int, default=1, help="rows of 2,048 tokens per pass (micro-batch)")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(_cell(args.cell[0], args.cell[1], int(args.cell[2]))))
        return
    if not args.plan:
        results = measure(args.rows)
        print(f"| pass ({args.rows} x {CONTEXT} tokens, vocab {VOCAB:,}, {results[0]['device']}) | before (MiB) "
              "| after (MiB) | ratio |")
        print("|---|---|---|---|")
        for phase in ("scoring", "update"):
            before = next(r for r in results if r["phase"] == phase and r["variant"] == "before")["peak_mib"]
            after = next(r for r in results if r["phase"] == phase and r["variant"] == "after")["peak_mib"]
            print(f"| {phase} | {before:,.0f} | {after:,.0f} | {before / max(after, 1e-9):.1f}x |")
        print()
    print_plan()


if __name__ == "__main__":
    main()
