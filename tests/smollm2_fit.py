"""One PPO iteration of SmolLM2-135M-Instruct on real MuSiQue questions (issue 17), shared by the fits
of tests/test_fit_smollm2.py: the rollout/PPO/trainer settings, the module and data builders, and
parameter digests. Run as a script it is one rank of the 2-process fit (DDP over gloo on CPU,
Lightning's own subprocess launcher re-runs this file for rank 1)::

    python tests/smollm2_fit.py OUT POLICY_DIR TRAIN_JSONL INDEX_DIR

Each rank writes ``OUT/rank{r}.json``: its global step and world size, the ids of the questions it
rolled out, its logged metrics, and a SHA-256 digest of every policy parameter before and after the
update (so the test compares both ranks' 135 M parameters exactly without shipping them)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script (and by Lightning's launcher for rank 1)
    sys.path.insert(0, str(TESTS))

from training_fixtures import make_module, one_thread  # noqa: E402

QUESTIONS = 2  # real MuSiQue questions per PPO iteration (over all ranks)
# One search turn of 24 tokens: the smallest rollout that still retrieves and writes.
SMOL_ROLLOUT = dict(max_turns=1, max_response_tokens=24, max_observation_tokens=64, max_context_tokens=768,
                    top_k=2, temperature=1.0, top_p=1.0)
VLLM_MEMORY_SHARE = 0.02  # of RAM for vLLM's KV cache (~0.5 GB): as tests/rollout/vllm_fixtures.py
TRAINER = dict(max_steps=1, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def rollout_config(backend: str = "hf"):
    from stepsearch.rollout.engine import RolloutConfig, VLLMSettings

    return RolloutConfig(**SMOL_ROLLOUT, backend=backend, vllm=VLLMSettings(memory_share=VLLM_MEMORY_SHARE))


def build_module(policy_dir, backend: str = "hf", micro_batch_size: int = QUESTIONS):
    """The PPO module on SmolLM2: shared critic trunk, one epoch, one optimizer step per iteration."""
    env = type("Env", (), {"sft_dir": policy_dir})
    return make_module(env, rollout=rollout_config(backend), model={"critic": "shared"}, log_samples_every_n_steps=0,
                       ppo={"ppo_epochs": 1, "mini_batch_size": QUESTIONS, "micro_batch_size": micro_batch_size})


def build_datamodule(train, index_dir, datamodule_class=None):
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.retrieval.factory import RetrieverConfig

    cls = datamodule_class or StepSearchDataModule
    return cls(train=str(train), val=str(train), retriever=RetrieverConfig(kind="bm25", index=str(index_dir)),
               batch_size=QUESTIONS, val_batch_size=QUESTIONS, max_val_examples=QUESTIONS, seed=0)


def policy_parameters(module) -> dict[str, torch.Tensor]:
    """The live policy's parameters by Hugging Face name (a compiled module's prefix removed)."""
    return {name.removeprefix("_orig_mod."): p for name, p in module.actor_critic.policy.named_parameters()}


def digests(params: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in params.items()}


def run_rank(out: Path, policy_dir: str, train: str, index_dir: str) -> None:
    import lightning.pytorch as pl

    from stepsearch.data.datamodule import StepSearchDataModule

    class RecordedQuestions(StepSearchDataModule):
        """Keeps the ids of the questions this rank rolls out."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.question_ids: list[str] = []

        def rollout(self, examples, **kwargs):
            self.question_ids.extend(ex.id for ex in examples)
            return super().rollout(examples, **kwargs)

    class DigestBeforeUpdate(pl.Callback):
        """The policy's digests once the strategy has set the module up, before the first rollout."""

        def on_train_start(self, trainer, module):
            self.before = digests(policy_parameters(module))

    module = build_module(policy_dir, micro_batch_size=1)  # 1 question per rank per optimizer step
    data = build_datamodule(train, index_dir, RecordedQuestions)
    digest_before = DigestBeforeUpdate()
    trainer = pl.Trainer(**TRAINER, devices=2, strategy="ddp", logger=False, callbacks=[digest_before],
                         default_root_dir=out)
    trainer.fit(module, data)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "global_step": trainer.global_step, "world_size": trainer.world_size, "question_ids": data.question_ids,
        "metrics": {name: float(value) for name, value in trainer.logged_metrics.items()},
        "before": digest_before.before, "after": digests(policy_parameters(module))}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    with one_thread():
        run_rank(Path(sys.argv[1]), *sys.argv[2:5])
