"""Generation under FSDP2: the rollout engine decodes with the policy's full weights, gathered once.

Ranks decode different numbers of steps, so per-layer all-gathers inside each decode step would
deadlock; :class:`FullWeightsForGeneration` gathers every layer once at the first forward of a
rollout and :func:`reshard_after_generation` shards them back before the next scoring pass.
Lives with the models (``ActorCritic.generation_model`` returns it); ``training.sharding`` shards them.
"""

from __future__ import annotations

from torch import nn

from stepsearch import lightning_adapter
from stepsearch.errors import StepSearchError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(trunk, "layers", None)
    if layers is None:
        raise StepSearchError(f"FSDP2: cannot find the decoder layers of {type(base).__name__} (expected .layers)")
    return list(layers)


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class FullWeightsForGeneration(nn.Module):
    """The policy for the rollout engine under FSDP2: the first forward of a rollout gathers every
    layer's full weights (one collective, on every rank at the same point) and keeps them until the
    next scoring pass; decoding then issues no collectives, whatever each rank's number of steps."""  # noqa: D401

    def __init__(self, actor_critic):
        super().__init__()
        object.__setattr__(self, "actor_critic", actor_critic)
        object.__setattr__(self, "wrapped", actor_critic.policy)  # plain attribute: read without nn.Module's lookup
        self.policy = actor_critic.policy

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["wrapped"], name)

    def get_base_model(self):
        """What a PEFT-aware caller inspects for ``forward``'s keywords: the wrapped model."""
        policy = self.__dict__["wrapped"]
        return policy.get_base_model() if hasattr(policy, "get_base_model") else policy

    def forward(self, *args, **kwargs):
        ac = self.actor_critic
        layers = self.__dict__.get("_fsdp_layers")
        if layers is None:  # the sharded layers do not change: one module-tree walk, not one per token
            layers = _fsdp_modules(ac.policy)
            object.__setattr__(self, "_fsdp_layers", layers)
        # The root's lazy init must come first (it claims the layers as its children); unshard()
        # does not run it, only a forward would, so call it (a private FSDP2 method: lightning_adapter).
        lightning_adapter.fsdp_lazy_init(ac.policy_scorer)
        # unshard() is a no-op (no collective) on gathered weights, so this costs nothing per decode
        # step; it all-gathers again only when something (a checkpoint's state dict) resharded them in
        # between, which happens on every rank alike, before its first decode step.
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        for m in [ac.policy_scorer] + layers:
            m.unshard()
        object.__setattr__(ac, "_generation_gathered", True)
        return self.policy(*args, **kwargs)


def reshard_after_generation(actor_critic) -> None:
    """Back to sharded weights before a scoring pass (every rank calls it at the same point)."""
    if not getattr(actor_critic, "_generation_gathered", False):
        return
    layers = _fsdp_modules(actor_critic.policy)
    for m in layers:
        m.set_reshard_after_forward(True, recurse=False)
        m.reshard()
    actor_critic.policy_scorer.reshard()
    object.__setattr__(actor_critic, "_generation_gathered", False)
