"""Shared, build-once training environment for the module/CLI/SFT/tracking tests.

A tiny generated world (~190 passages, 64 train / 16 val questions), a real BM25 (Pyserini) index of
its corpus, a tiny Qwen2 model and a short warm-start of it on golden 1–2-hop trajectories (so the
policy already writes tags and PPO has something to work with). Everything is built once per
process under pytest's session temp dir: the test files import the fixtures below, and the
module-level cache makes the build happen once however many test modules import them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Small world: sizes chosen so every generated relation still has entities (≈190 passages).
WORLD_SIZES = dict(num_people=30, num_places=10, num_regions=4, num_countries=2, num_orgs=8, num_works=16,
                   train_size=64, val_size=16, test_size=8)
TINY_SIZES = dict(vocab_size=512, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128)
# Short turns and a small context keep a rollout of 4–8 questions under a second or two.
ROLLOUT = dict(template="think", max_turns=3, max_response_tokens=64, max_observation_tokens=96,
               max_context_tokens=768, top_k=3, temperature=1.0, top_p=1.0)
WARM_START = dict(hops=[1, 2], epochs=10, lr=1e-2, batch_size=8)


@dataclass
class TrainingEnv:
    """Paths and shared objects of the built environment."""

    world_dir: Path
    corpus: Path
    train: Path
    val: Path
    test: Path
    index_dir: Path
    tiny_dir: Path
    sft_dir: Path
    retriever: object
    warm_summary: dict


_CACHE: dict[str, TrainingEnv] = {}


def rollout_config(**overrides):
    from stepsearch.rollout.engine import RolloutConfig

    return RolloutConfig(**{**ROLLOUT, **overrides})


@contextlib.contextmanager
def one_thread():
    """2 shared cores: small matmuls with 2 OpenMP threads stall when the other core is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_env(root: Path) -> TrainingEnv:
    """Build (once per process) the world, index, tiny model and warm-started policy under ``root``."""
    key = str(root)
    if key not in _CACHE:
        with one_thread():
            _CACHE[key] = _build_env(root)
    return _CACHE[key]


def _build_env(root: Path) -> TrainingEnv:
    from stepsearch.data.sources import load_examples
    from stepsearch.data.synthetic import WorldConfig, write_world
    from stepsearch.models.tiny import make_tiny_model
    from stepsearch.retrieval.bm25 import BM25Retriever
    from stepsearch.retrieval.index import build_index
    from stepsearch.training.sft import WarmStartSettings, run_warm_start

    paths = write_world(WorldConfig(seed=0, **WORLD_SIZES), root / "world")
    index_dir = build_index(paths["corpus"], root / "index_bm25", kind="bm25", show_progress=False)
    retriever = BM25Retriever(index_dir)
    tiny_dir = make_tiny_model(root / "tiny", [str(paths["corpus"]), str(paths["train"])], seed=0, **TINY_SIZES)
    torch.manual_seed(0)
    summary = run_warm_start(str(tiny_dir), root / "sft", load_examples(paths["train"]), retriever,
                             rollout_config(), WarmStartSettings(**WARM_START))
    env = TrainingEnv(world_dir=root / "world", corpus=paths["corpus"], train=paths["train"], val=paths["val"],
                      test=paths["test"], index_dir=Path(index_dir), tiny_dir=Path(tiny_dir), sft_dir=root / "sft",
                      retriever=retriever, warm_summary=summary)
    return env


@pytest.fixture(scope="session")
def training_env(tmp_path_factory) -> TrainingEnv:
    return build_env(tmp_path_factory.getbasetemp() / "training_env")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def make_datamodule(env: TrainingEnv, **overrides):
    """A DataModule over the world's files that reuses the session's BM25 retriever."""
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.retrieval.factory import RetrieverConfig

    kwargs = dict(train=str(env.train), val=str(env.val), retriever=RetrieverConfig(kind="bm25", index=str(env.index_dir)),
                  batch_size=4, val_batch_size=8, max_val_examples=8, seed=0)
    kwargs.update(overrides)
    datamodule = StepSearchDataModule(**kwargs)
    datamodule._retriever = env.retriever
    return datamodule


def make_module(env: TrainingEnv, *, ppo=None, model=None, optim=None, rewards=None, rollout=None, **kwargs):
    """A ``StepSearchPPO`` on the warm-started policy; several optimizer steps per PPO iteration."""
    from stepsearch.models.policy import PolicySettings
    from stepsearch.training.module import OptimSettings, PPOSettings, StepSearchPPO

    ppo_settings = PPOSettings(**{"ppo_epochs": 2, "mini_batch_size": 2, "micro_batch_size": 1, **(ppo or {})})
    model_settings = PolicySettings(**{"name_or_path": str(env.sft_dir), **(model or {})})
    optim_settings = OptimSettings(**{"actor_lr": 1e-3, "critic_lr": 1e-3, "actor_warmup_ratio": 0.0,
                                      "critic_warmup_ratio": 0.0, **(optim or {})})
    return StepSearchPPO(model=model_settings, rollout=rollout or rollout_config(), rewards=rewards, ppo=ppo_settings,
                         optim=optim_settings, **kwargs)


def python_env() -> dict:
    """Environment for subprocess runs of ``python -m stepsearch`` from the repo (offline, quiet)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable


# ------------------------------------------------------------------ synthetic PPO batches (no rollout)

SYNTH_SIZES = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def tiny_model_dir(root: Path) -> Path:
    """A random tiny Qwen2 (tokenizer trained on the built-in texts), built once per ``root``."""
    key = f"tiny:{root}"
    if key not in _CACHE:
        from stepsearch.models.tiny import make_tiny_model

        with one_thread():
            _CACHE[key] = make_tiny_model(root / "tiny_synth", [], seed=0, **SYNTH_SIZES)
    return _CACHE[key]


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0, group_size: int = 1):
    """A ``RolloutBatch`` of random tokens with prompt/response/observation/padding structure: per
    row a prompt of 3–5 tokens, a response with a 2-token "observation" block cut out of the policy
    mask, right padding, and placed scores at a few policy tokens."""
    from stepsearch.training.iteration import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    attn = torch.zeros(rows, length, dtype=torch.long)
    policy = torch.zeros(rows, length, dtype=torch.bool)
    response = torch.zeros(rows, length, dtype=torch.bool)
    scores = torch.zeros(rows, length)
    for b in range(rows):
        prompt = 3 + int(torch.randint(0, 3, (1,), generator=g))
        real = length - int(torch.randint(0, 4, (1,), generator=g))
        attn[b, :real] = 1
        response[b, prompt:real] = True
        policy[b, prompt:real] = True
        obs = prompt + 2 + int(torch.randint(0, max(real - prompt - 4, 1), (1,), generator=g))
        policy[b, obs:obs + 2] = False
        last = int(policy[b].nonzero().max())
        scores[b, last] = float(torch.rand(1, generator=g) * 2 - 1)
        mid = int(policy[b].nonzero()[len(policy[b].nonzero()) // 2])
        scores[b, mid] += 0.3
    ids = torch.where(attn.bool(), ids, torch.zeros_like(ids))
    groups = torch.arange(rows) // group_size
    return RolloutBatch(input_ids=ids, attention_mask=attn, policy_mask=policy[:, 1:], response_mask=response[:, 1:],
                        token_scores=scores[:, 1:], group_ids=groups)


def plain_collectives():
    """Single-process :class:`Collectives` with a plain optimizer step (norm not measured: 0)."""
    from stepsearch.training.iteration import Collectives

    def step(optimizer, params):
        optimizer.step()
        return 0.0

    return Collectives(step=step)


def synthetic_trajectory(rows: int, length: int, vocab: int, seed: int = 0):
    """``(Trajectory, placed [B, L])`` from :func:`synthetic_batch`, as a rollout would hand them over."""
    from stepsearch.rollout.trajectory import Trajectory, TrajectoryRecord

    batch = synthetic_batch(rows, length, vocab, seed)
    pad = torch.zeros(rows, 1, dtype=torch.bool)
    response = torch.cat([pad, batch.response_mask], 1)
    prompt_lengths = response.float().argmax(1)
    trajectory = Trajectory(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            loss_mask=torch.cat([pad, batch.policy_mask], 1).long(), prompt_lengths=prompt_lengths,
                            records=[TrajectoryRecord(prompt_text="", response_text="", answer=None) for _ in range(rows)])
    placed = torch.cat([torch.zeros(rows, 1), batch.token_scores], 1)
    return trajectory, placed


# ------------------------------------------------------------------ float32 rounding bounds (CPU-independent)

EPS32 = torch.finfo(torch.float32).eps


def float32_update_bound(config, tokens: int, steps: int) -> float:
    """A worst-case bound on the relative rounding error of a float32 PPO update, from float32's
    epsilon and the number of accumulated operations, so it holds whatever summation order a CPU's
    BLAS kernels pick (issue 20: a tolerance tuned on one CPU failed on another).

    Each gradient element is a chain of float32 reductions: over the vocabulary (log-softmax and the
    LM head), over the widths of every layer (attention projections 4·hidden, the MLP's intermediate
    width) and over the ``tokens`` of a minibatch (weight gradients). A sum of n terms carries at
    most about n·eps relative error (Higham's γ_n), so one step's update is off by at most
    eps·n_ops relative, and ``steps`` optimizer steps add up."""
    n_ops = (config.vocab_size + tokens
             + config.num_hidden_layers * (4 * config.hidden_size + config.intermediate_size))
    return EPS32 * n_ops * steps


def relative_update_difference(got, want, start) -> float:
    """‖got − want‖ / ‖want − start‖ over flattened parameter lists: a difference measured against
    the update, not against the parameters (which would hide it behind their size)."""
    def flat(params):
        return torch.cat([p.detach().flatten().double() for p in params])

    got, want, start = flat(got), flat(want), flat(start)
    return float((got - want).norm() / (want - start).norm())
