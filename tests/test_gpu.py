"""GPU paths of ``StepSearchPPO`` on one CUDA device (skipped without one): bf16 mixed precision
and bf16 weights, a few real PPO iterations each; FSDP refused in one line.

Retrieval here is a small in-test lexical ranker (IDF-weighted word overlap) over the generated
world, not Pyserini: the GPU machines we test on have no Java and cannot take pyserini's wheels,
and these tests are about the model side (dtypes, sharding, generation on the device). Everything
else is the real stack: the generated world, a tiny Qwen2 model with its own BPE tokenizer, the
rollout engine, the rewards, the Lightning Trainer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORLD_SIZES = dict(num_people=30, num_places=10, num_regions=4, num_countries=2, num_orgs=8, num_works=16,
                   train_size=64, val_size=16, test_size=8)
TINY_SIZES = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


class OverlapRetriever:
    """IDF-weighted word-overlap ranking over a corpus JSONL (read by the project's corpus reader)."""

    def __init__(self, corpus_path: Path):
        from stepsearch.retrieval.corpus import read_corpus

        self.passages = list(read_corpus(corpus_path, strict=True).passages)
        self.words = [set(self._tokens(f"{p.title} {p.text}")) for p in self.passages]
        df = Counter(w for words in self.words for w in words)
        self.idf = {w: math.log(len(self.passages) / n) + 1.0 for w, n in df.items()}

    @staticmethod
    def _tokens(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def search(self, queries: list[str], k: int):
        out = []
        for query in queries:
            q = set(self._tokens(query))
            scored = sorted(range(len(self.passages)),
                            key=lambda i: (-sum(self.idf.get(w, 0.0) for w in q & self.words[i]), i))
            out.append([self.passages[i] for i in scored[:k]])
        return out


@pytest.fixture(scope="module")
def gpu_env(tmp_path_factory):
    from stepsearch.data.synthetic import WorldConfig, write_world
    from stepsearch.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gpu")
    paths = write_world(WorldConfig(seed=0, **WORLD_SIZES), root / "world")
    tiny = make_tiny_model(root / "tiny", [str(paths["corpus"]), str(paths["train"])], seed=0, **TINY_SIZES)
    return {"paths": paths, "tiny": str(tiny), "retriever": OverlapRetriever(paths["corpus"]), "root": root}


def _fit(env, name: str, *, strategy="auto", precision="bf16-mixed", dtype="float32", critic="separate"):
    import lightning as L

    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.models.policy import PolicySettings
    from stepsearch.training.module import OptimSettings, PPOSettings, StepSearchPPO
    from stepsearch.rollout.engine import RolloutConfig

    paths = env["paths"]
    datamodule = StepSearchDataModule(train=str(paths["train"]), val=str(paths["val"]), batch_size=8, val_batch_size=8,
                                      max_val_examples=8, seed=0)
    datamodule._retriever = env["retriever"]
    module = StepSearchPPO(
        model=PolicySettings(name_or_path=env["tiny"], dtype=dtype, critic=critic),
        rollout=RolloutConfig(template="compact", max_turns=3, max_response_tokens=32, max_observation_tokens=96,
                              max_context_tokens=512, top_k=3, temperature=1.0, top_p=1.0),
        ppo=PPOSettings(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2),
        optim=OptimSettings(actor_lr=1e-3, critic_lr=1e-3, actor_warmup_ratio=0.0, critic_warmup_ratio=0.0),
    )
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, max_steps=3,
                        default_root_dir=env["root"] / name, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None, val_check_interval=3, log_every_n_steps=1)
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def _check_trained(trainer, module):
    assert trainer.global_step == 3  # PPO iterations, not optimizer steps
    metrics = trainer.callback_metrics
    for key in ("train/reward", "train/policy_loss", "train/value_loss", "val/em", "val/f1"):
        assert key in metrics, key
        assert math.isfinite(float(metrics[key])), key
    params = list(module.actor_critic.actor_parameters())
    assert all(torch.isfinite(p.detach().float()).all() for p in params)
    assert module.history.get("step0") is not None and "val/em" in module.history["step0"]


def test_bf16_mixed_ppo_on_gpu(gpu_env):
    from stepsearch.models.policy import ActorCritic, PolicySettings

    trainer, module = _fit(gpu_env, "bf16_mixed")
    _check_trained(trainer, module)
    assert trainer.strategy.root_device.type == "cuda"
    assert module.val_metrics.device.type == "cuda"  # metric states follow the module (NCCL sync needs it)
    initial = ActorCritic(PolicySettings(name_or_path=gpu_env["tiny"]))
    moved = [not torch.equal(a.detach().cpu(), b.detach().cpu()) for a, b in
             zip(module.actor_critic.actor_parameters(), initial.actor_parameters())]
    assert any(moved), "no actor parameter changed in 3 PPO iterations"


def test_bf16_weights_ppo_on_gpu(gpu_env):
    trainer, module = _fit(gpu_env, "bf16_true", precision="bf16-true", dtype="bfloat16", critic="shared")
    _check_trained(trainer, module)
    assert {p.dtype for p in module.actor_critic.actor_parameters()} == {torch.bfloat16}


def test_fsdp_is_refused_in_one_line(gpu_env):
    """FSDP1 rejects the backward passes a PPO iteration runs inside training_step (seen on an H200):
    the module refuses it at setup with a message pointing at FSDP2 (configs/trainer/fsdp.yaml)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from stepsearch.errors import StepSearchError

    try:
        with pytest.raises(StepSearchError, match="FSDP1 .* use FSDP2"):
            _fit(gpu_env, "fsdp", strategy=FSDPStrategy(sharding_strategy="FULL_SHARD"))
    finally:  # Lightning leaves the process group up; later tests must not sync through it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
