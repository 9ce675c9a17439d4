"""Strategy glue for StePPO: FSDP2 sharding, gradient reduction and clipping, global sizes and sums.

``stepsearch.training.iteration`` is strategy-free; this module gives it a :class:`~stepsearch.training.iteration.Collectives`
for the running strategy:

- single process: identity sums, plain backward;
- DDP (``configs/trainer/ddp.yaml``): backward runs without DDP's per-backward reducer (PPO's actor
  and critic losses each touch part of the parameters, which the reducer rejects), and each optimizer
  step all-reduces (SUM) its gradients as ONE flat buffer per optimizer;
- FSDP2 (``configs/trainer/fsdp.yaml``, :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy``
  with the whole world as the data-parallel mesh): actor, critic and reference are
  ``fully_shard``-ed per decoder layer in ``configure_model``, float32 master weights, compute in
  ``PolicySettings.compute_dtype`` (bf16 on GPU) via ``MixedPrecisionPolicy``, gradients reduced in
  float32 by FSDP (averaged, so losses are scaled by the world size to sum them). Value heads are
  their own float32 unit. Generation gathers the policy's full weights once per rollout
  (:class:`FullWeightsForGeneration`): ranks decode different numbers of steps, which per-layer
  all-gathers would deadlock.
- DeepSpeed is refused: Lightning's ``DeepSpeedStrategy`` drives one optimizer, and StePPO's separate
  critic has its own (README "Scaling out").

Clipping runs in ``on_before_optimizer_step`` (after Lightning's AMP unscale) over the optimizer's
parameters; a non-finite norm drops the gradients so the step changes nothing (counted as
``train/skipped_steps``).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from stepsearch import lightning_adapter
from stepsearch.errors import StepSearchError
from stepsearch.models.sharded_generation import decoder_layers
from stepsearch.ppo.algorithms import resolve_algorithm
from stepsearch.training.iteration import Collectives
from stepsearch.models.loading import resolve_dtype

LOW_PRECISION = ("bfloat16", "float16")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2: every rank is a data-parallel rank (no tensor
    parallelism), so the sampler splits prompts over all ranks and the mesh shards over all of them."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        lightning_adapter.set_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()


def _attached_trainer(module):
    """The module's trainer, ``None`` when it has none (``LightningModule.trainer`` raises then)."""
    try:
        return module.trainer
    except (RuntimeError, AttributeError):
        return None


def _world(module) -> tuple[int, int]:
    trainer = _attached_trainer(module)
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def check_strategy_and_sizes(module, stage: str) -> dict:
    """Refuse unsupported strategies and precisions; derive per-rank sizes from the global config."""
    strategy = module.trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        raise StepSearchError("trainer.strategy: DeepSpeed is not supported (Lightning's DeepSpeedStrategy drives one "
                              "optimizer; StePPO's critic has its own): use --trainer configs/trainer/fsdp.yaml")
    if isinstance(strategy, FSDPStrategy):
        # FSDP1 wraps training_step in the root's forward: PPO's several backward passes inside one
        # training_step are rejected by its state machine (seen on an H200). FSDP2 has no root forward.
        raise StepSearchError("trainer.strategy: FSDP1 (FSDPStrategy) cannot run several backward passes in one "
                              "training_step; use FSDP2: --trainer configs/trainer/fsdp.yaml")
    settings, optim = module.model_settings, module.optim
    dtype = _dtype_name(settings.dtype)
    if dtype in LOW_PRECISION and min(optim.actor_lr, optim.critic_lr) < 1e-5 and optim.optimizer == "torch.optim.AdamW":
        raise StepSearchError(f"model.model.dtype={settings.dtype} with lr {min(optim.actor_lr, optim.critic_lr):g} < 1e-5: "
                              "AdamW updates fall below half a bf16 ulp and the weights do not move; keep dtype float32 "
                              "with precision bf16-mixed or fsdp.yaml, or set model.optim.optimizer to one that handles it")
    world, _ = _world(module)
    cfg = module.ppo
    algorithm = getattr(module, "algorithm", None) or resolve_algorithm(cfg)  # resolved at setup (module)
    group = algorithm.group_size
    datamodule = getattr(module.trainer, "datamodule", None)
    batch = getattr(datamodule, "batch_size", None)
    problems = []
    if batch is not None and batch % world:
        problems.append(f"data.batch_size={batch}")
    if cfg.mini_batch_size % world:
        problems.append(f"model.ppo.mini_batch_size={cfg.mini_batch_size}")
    if problems:
        raise StepSearchError(f"{' and '.join(problems)} must be divisible by the number of ranks ({world}): "
                              "batch sizes are global (all ranks)")
    return {"batch_size": None if batch is None else batch // world,
            "mini_batch_size": cfg.mini_batch_size // world * group}


def _dtype_name(dtype) -> str:
    resolved = resolve_dtype(dtype)
    return str(resolved).removeprefix("torch.")


def optimizer_class(optim, settings):
    """The optimizer class named by ``optim.optimizer`` (an import path)."""
    import importlib

    module_name, _, name = optim.optimizer.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise StepSearchError(f"model.optim.optimizer: cannot import {optim.optimizer!r}") from None


# --------------------------------------------------------------------------------- collectives


def _ddp(strategy) -> bool:
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy) and strategy.world_size > 1


def _fsdp2(strategy) -> bool:
    return isinstance(strategy, ModelParallelStrategy) and strategy.world_size > 1


def collectives(module) -> Collectives:
    """The :class:`Collectives` of the module's running strategy."""
    strategy = module.trainer.strategy
    world, rank = _world(module)
    if world == 1:
        return Collectives(backward=module.manual_backward, step=_stepper(module, reduce=False))
    device = module.device

    def reduce_sum(tensor):
        out = tensor.detach().to(device).clone()
        torch.distributed.all_reduce(out)
        return out.to(tensor.device)

    def gather(tensor):
        local = tensor.detach().to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    if _ddp(strategy):
        def backward(loss):
            with strategy.block_backward_sync():
                module.manual_backward(loss)

        return Collectives(reduce_sum, gather, backward, _stepper(module, reduce=True), 1.0, world, rank)
    if _fsdp2(strategy):
        return Collectives(reduce_sum, gather, module.manual_backward, _stepper(module, reduce=False), float(world),
                           world, rank)
    raise StepSearchError(f"trainer.strategy: {type(strategy).__name__} with {world} processes is not supported; "
                          "use configs/trainer/ddp.yaml or configs/trainer/fsdp.yaml")


def _stepper(module, reduce: bool):
    def step(optimizer, params) -> float:
        if reduce:
            flat_all_reduce(params)
        module.last_grad_norm = float("nan")
        module.step_optimizer(optimizer)  # one global step per PPO iteration; clipping in on_before_optimizer_step
        return module.last_grad_norm

    return step


def flat_all_reduce(params) -> None:
    """Sum gradients over ranks as one flat buffer per dtype. Every rank runs the same graph, so the
    same parameters have gradients; one without (e.g. GRPO's unused value head) stays ``None`` and
    is not stepped, as on one process."""
    by_dtype: dict = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_or_skip(module, optimizer, max_norm: float) -> float:
    """Global gradient norm of ``optimizer``'s parameters, clipped to ``max_norm``; when it is not
    finite the gradients are dropped (the optimizer then skips those parameters). Returns the norm."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    if not math.isfinite(norm):
        for p in params:
            p.grad = None
    return norm


def global_means(module, means: dict[str, float], count: int) -> dict[str, float]:
    """Means over all ranks of per-rank means of ``count`` items each (one all-reduce)."""
    world, _ = _world(module)
    if world == 1 or not means:
        return {k: float(v) for k, v in means.items()}
    names = sorted(means)
    values = torch.tensor([float(means[n]) * count for n in names] + [float(count)], dtype=torch.float64,
                          device=module.device)
    torch.distributed.all_reduce(values)
    return {n: float(values[i] / values[-1]) for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------- FSDP2


def _compute_dtype(settings, device: torch.device):
    if settings.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None

    dtype = resolve_dtype(settings.compute_dtype)
    return None if dtype == torch.float32 else dtype


def shard_if_model_parallel(module) -> None:
    """Under :class:`ModelParallelStrategy`: ``fully_shard`` each decoder layer of policy, critic
    and reference, the value heads (float32), then each model's root; mixed precision by settings."""
    trainer = _attached_trainer(module)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ac = module.actor_critic
    device = trainer.strategy.root_device
    mesh = init_device_mesh(device.type, (trainer.world_size,))
    compute = _compute_dtype(ac.settings, device)
    mixed = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for model in (ac.policy, ac.reference, ac.critic.trunk if ac.critic is not None else None):
        if model is None:
            continue
        model.to(device)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mixed)
    heads = [h for h in (ac.value_head, getattr(ac.critic, "value_head", None)) if h is not None]
    for head in heads:
        head.to(device)
        fully_shard(head, mesh=mesh, mp_policy=fp32)
    fully_shard(ac.policy_scorer, mesh=mesh, mp_policy=mixed)
    if ac.reference_scorer is not None:
        fully_shard(ac.reference_scorer, mesh=mesh, mp_policy=mixed)
    if ac.critic is not None:
        fully_shard(ac.critic, mesh=mesh, mp_policy=mixed)
    ac.sharded = True
