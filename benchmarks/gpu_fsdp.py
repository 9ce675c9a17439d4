"""FSDP2 on one CUDA GPU: seconds per PPO iteration and peak GPU memory for a model with
Qwen2.5-0.5B's shapes (random weights built from a config, nothing downloaded).

    python benchmarks/gpu_fsdp.py                   # 3 iterations (1 warm-up), recipe lengths
    python benchmarks/gpu_fsdp.py --iterations 2 --rollouts 8
    python benchmarks/gpu_fsdp.py --smoke             # CPU, tiny shapes: checks the script itself

What runs: Lightning's Trainer with ``stepsearch.training.sharding.FSDP2Strategy`` (``ModelParallelStrategy``,
1 rank), actor + separate critic + bf16 reference built in ``configure_model`` and ``fully_shard``-ed per
decoder layer with bf16 compute (``MixedPrecisionPolicy``) over float32 master weights, gradient
checkpointing on. Each iteration: (1) rollout: Hugging Face ``generate`` with the policy's gathered
weights (``FullWeightsForGeneration``), ``--rollouts`` prompts of 256 tokens, one turn of
``max_response_tokens`` = 800 sampled tokens (a random model does not stop early, so every row runs
the full turn); (2) the PPO update of ``stepsearch.training.iteration.ppo_iteration`` (scoring passes, GAE,
whitening, actor and critic AdamW steps, micro-batch 8) on trajectories at the recipe's full
context (4,096 tokens, 30% policy tokens: the rest prompt and ``<information>``), synthetic token
ids and rewards. Retrieval, rewards and MLflow are not involved (the GPU machine has no
Pyserini/Java/MLflow). Prints a table: generation s, update s, iteration s, peak GPU GiB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

QWEN_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)


TINY = dict(QWEN_05B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_model_dir(root: Path, shapes: dict) -> Path:
    """A random Qwen2.5-0.5B-shaped model + a small local tokenizer, saved like a real checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stepsearch.models.tiny import _builtin_texts, train_tokenizer

    tokenizer = train_tokenizer(_builtin_texts(), 512)
    config = Qwen2Config(**shapes, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def synthetic_rollouts(rows: int, context: int, vocab: int, device, seed: int):
    """A full-context rollout batch: 256 prompt tokens, then 200-token policy blocks between
    466-token observations (≈30% policy tokens), a score at each block end and at the last token."""
    from stepsearch.rollout.trajectory import Trajectory, TrajectoryRecord

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, context), generator=g)
    loss_mask = torch.zeros(rows, context, dtype=torch.long)
    placed = torch.zeros(rows, context)
    for start in range(256, context, 666):
        end = min(start + 200, context)
        loss_mask[:, start:end] = 1
        placed[:, end - 1] = torch.rand(rows, generator=g) - 0.5
    placed[:, -1] += torch.rand(rows, generator=g)
    loss_mask[:, -1] = 1
    trajectory = Trajectory(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=loss_mask,
                            prompt_lengths=torch.full((rows,), 256),
                            records=[TrajectoryRecord(prompt_text="", response_text="", answer=None)] * rows)
    return trajectory.to(device), placed.to(device)


def run(args) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from stepsearch.models.policy import ActorCritic, PolicySettings
    from stepsearch.training.sharding import FSDP2Strategy, clip_or_skip, collectives, shard_if_model_parallel
    from stepsearch.training.iteration import RolloutBatch, ppo_iteration

    root = Path(tempfile.mkdtemp(prefix="gpu_fsdp_"))
    t0 = time.perf_counter()
    shapes = TINY if args.smoke else QWEN_05B
    model_dir = build_model_dir(root / "qwen05b_shapes", shapes)
    build_s = time.perf_counter() - t0
    rows_out: list[dict] = []

    class PPOConfig:  # the recipe's PPO settings (configs/stepsearch_qwen2.5_3b.yaml)
        algorithm, ppo_epochs, mini_batch_size, micro_batch_size = "steppo", 1, args.rollouts // 2, 8
        loss_agg, clip_eps, value_clip, entropy_coef, value_coef = "token-mean", 0.2, 0.5, 0.001, 0.5
        gamma, lam, kl_coef, kl_estimator, whiten_advantages, released_gae = 1.0, 1.0, 0.001, "k1", True, False
        tis_cap = None

    class Bench(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.actor_critic = None
            self.last_grad_norm = float("nan")

        def configure_model(self):
            if self.actor_critic is None:
                settings = PolicySettings(name_or_path=str(model_dir), reference_dtype="bfloat16",
                                          gradient_checkpointing=True)
                self.actor_critic = ActorCritic(settings, seed=0)
                shard_if_model_parallel(self)

        def configure_optimizers(self):
            ac = self.actor_critic
            return [torch.optim.AdamW(ac.actor_parameters(), lr=5e-7, weight_decay=0.01),
                    torch.optim.AdamW(ac.critic_parameters(), lr=5e-7, weight_decay=0.01)]

        def on_before_optimizer_step(self, optimizer):
            self.last_grad_norm = clip_or_skip(self, optimizer, 1.0)

        def training_step(self, batch, batch_idx):
            ac = self.actor_critic
            _sync()
            t0 = time.perf_counter()
            prompts = torch.randint(0, 512, (args.rollouts, 256), device=self.device)
            generation = ac.generation_model()
            generation(input_ids=prompts[:, :8])  # gathers the full weights once (FSDP2), as a rollout's first step
            ac.policy.eval()  # as the rollout engine: eval mode keeps the KV cache on under checkpointing
            with torch.no_grad():
                out = ac.policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                         max_new_tokens=args.response_tokens, min_new_tokens=args.response_tokens,
                                         top_p=0.95, temperature=1.0, pad_token_id=0)
            ac.policy.train()
            _sync()
            t1 = time.perf_counter()
            trajectory, placed = synthetic_rollouts(args.rollouts, args.context, shapes["vocab_size"], self.device,
                                                    batch_idx)
            batch = RolloutBatch.from_trajectory(trajectory, placed, torch.arange(args.rollouts, device=self.device))
            stats = ppo_iteration(ac, batch, PPOConfig, self.optimizers(), [ac.actor_parameters(),
                                  ac.critic_parameters()], collectives(self), beta=0.001, temperature=1.0,
                                  generator=torch.Generator().manual_seed(batch_idx))
            _sync()
            t2 = time.perf_counter()
            rows_out.append(dict(iteration=batch_idx, generated=int(out.shape[1] - 256), generation_s=t1 - t0,
                                 update_s=t2 - t1, peak_gib=_peak_gib(),
                                 policy_loss=stats["policy_loss"], grad_norm=stats["actor_grad_norm"]))
            print(rows_out[-1], flush=True)

    trainer = L.Trainer(accelerator="cpu" if args.smoke else "gpu", devices=1, strategy=FSDP2Strategy(), precision="32-true",
                        max_epochs=1, limit_train_batches=args.iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=root)
    trainer.fit(Bench(), DataLoader(list(range(args.iterations)), batch_size=1))
    timed = rows_out[1:] or rows_out
    device = "CPU smoke run" if args.smoke else torch.cuda.get_device_name()
    print(f"\nmodel: {'tiny' if args.smoke else 'Qwen2.5-0.5B'} shapes, random weights (built in {build_s:.0f} s); {device}; "
          f"torch {torch.__version__}; FSDP2 1 rank, bf16 compute, fp32 master weights, gradient checkpointing")
    print(f"| rollouts | generated tokens/row | context (update) | generation s | update s | iteration s "
          f"| peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    gen = sum(r["generation_s"] for r in timed) / len(timed)
    upd = sum(r["update_s"] for r in timed) / len(timed)
    print(f"| {args.rollouts} | {timed[0]['generated']} | {args.context} | {gen:.1f} | {upd:.1f} | {gen + upd:.1f} "
          f"| {max(r['peak_gib'] for r in rows_out):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (the first is a warm-up)")
    parser.add_argument("--rollouts", type=int, default=16, help="prompts per iteration on this GPU (128 / 8 GPUs)")
    parser.add_argument("--response_tokens", type=int, default=800, help="sampled tokens per rollout")
    parser.add_argument("--context", type=int, default=4096, help="trajectory length in the update")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, short lengths (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        args.iterations, args.rollouts, args.response_tokens, args.context = 2, 4, 16, 1400
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_fsdp.py needs a CUDA GPU")
    run(args)


if __name__ == "__main__":
    main()
