"""Exact continuation of a resumed ``fit``: every rank's RNG states and the training data order.

Kept in the checkpoint by ``StepSearchPPO.on_save_checkpoint`` (RNG states, gathered from all
ranks) and by Lightning's fit loop (the train loader's :meth:`ResumableDataLoader.state_dict`), so a
run killed after iteration ``k`` and resumed trains on the same batches with the same random draws
as one that was never interrupted (``tests/test_resume.py`` checks parameters and metrics).
"""

from __future__ import annotations

from torch.utils.data import DataLoader


# ------------------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) in ``weights_only``-loadable types."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": (version, tuple(internal), gauss), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)),
                                                                    int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(trainer) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective: call on all ranks, as checkpoint saving is)."""
    import torch.distributed as dist

    state = rng_state()
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        states: list = [None] * trainer.world_size
        dist.all_gather_object(states, state)
        return states
    return [state]


# ------------------------------------------------------------------------------------- data order

class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position survives a checkpoint.

    Lightning stores ``state_dict()`` in the fit loop's checkpoint state and calls
    ``load_state_dict`` before iterating again on resume. The state is the batches handed out in the
    epoch (and, for a sampler that shuffles with a ``generator``, its state at the start of the
    epoch and after the order was drawn): a mid-epoch resume replays the same order and skips what
    was trained on; an end-of-epoch one draws the next epoch's order. The training sampler
    (``data.sampling.GlobalBatchSampler``) orders by ``(seed, epoch)``, which Lightning restores,
    so only the skip applies to it. An uninterrupted run's order is unchanged.
    """

    def __iter__(self):
        return self._iterate()  # a generator: nothing is drawn before Lightning's set_epoch

    def _iterate(self):
        pending = self.__dict__.pop("_pending", None)
        generator = getattr(self.sampler, "generator", None)
        skip = 0
        if pending is not None:
            if pending["batches"] >= pending["length"]:
                state = pending["after_draw"]
            else:
                state, skip = pending["epoch_start"], pending["batches"]
            if generator is not None and state is not None:
                generator.set_state(state)
        self._epoch_start = generator.get_state().clone() if generator is not None else None
        iterator = DataLoader.__iter__(self)
        for _ in range(skip):
            next(iterator)
        self._batches = skip
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        generator = getattr(self.sampler, "generator", None)
        return {"batches": getattr(self, "_batches", 0), "length": len(self),
                "epoch_start": getattr(self, "_epoch_start", None),
                "after_draw": generator.get_state().clone() if generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)
