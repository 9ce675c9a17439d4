"""The training order: global batches drawn once per epoch, each rank taking its strided share.

:class:`GlobalBatchSampler` makes the set of prompts in PPO iteration ``k`` the same for any number
of ranks: epoch ``e`` draws one permutation of the training examples from a generator seeded by
``(seed, e)``; global batch ``k`` is positions ``[k·B, (k+1)·B)`` of it, and rank ``r`` of ``W``
takes positions ``r, r+W, r+2W, …`` of that batch (``B/W`` prompts), which is the layout
``stepsearch.training.iteration`` assumes when it forms minibatches and GRPO groups across ranks (local prompt
``j`` of rank ``r`` is global prompt ``j·W + r``). One process takes the whole batch in order.

The last global batch of an epoch is filled up to ``B`` with the first examples of the epoch's
order (as ``DistributedSampler`` pads, but identically for any ``W``): every iteration trains on
``B`` prompts, and no example is dropped. The order is a function of ``(seed, epoch)`` only, so a
resumed run (Lightning restores the epoch and calls :meth:`set_epoch`) draws the same one; the
loader skips the batches already trained on (``stepsearch.data.continuation.ResumableDataLoader``).

It subclasses ``DistributedSampler`` so that Lightning keeps it under DDP/FSDP2 instead of putting
its own distributed sampler in its place (which would stride the whole epoch, not each batch).
"""

from __future__ import annotations

import torch
from torch.utils.data.distributed import DistributedSampler

from stepsearch.errors import StepSearchError
from stepsearch.rollout.seeding import stable_seed


def global_order(size: int, global_batch: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s example order, padded to whole global batches (module docstring)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(stable_seed("epoch", seed, epoch) % (2**63 - 1))).tolist()
    short = -len(order) % global_batch
    while short:  # fewer examples than one batch: wrap around as often as needed
        take = order[:short]
        order += take
        short -= len(take)
    return order


class GlobalBatchSampler(DistributedSampler):
    """This rank's indices, batch by batch, of the epoch's global order (module docstring).

    Args:
        size: number of training examples.
        global_batch: prompts per PPO iteration over all ranks.
        rank, world_size: this process's rank and the number of ranks.
        seed: seeds the per-epoch permutation.
    """

    def __init__(self, size: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if size < 1:
            raise StepSearchError("no training examples to sample from")
        if global_batch < 1 or global_batch % world_size:
            raise StepSearchError(f"data.batch_size={global_batch} must be a positive multiple of the number of "
                                  f"ranks ({world_size}): batch sizes are global (all ranks)")
        # DistributedSampler's own fields (Lightning reads num_replicas/rank); its __iter__ is replaced.
        self.dataset = range(size)
        self.num_replicas, self.rank, self.seed, self.epoch = world_size, rank, seed, 0
        self.shuffle, self.drop_last = True, False
        self.size, self.global_batch = size, global_batch
        self.per_rank = global_batch // world_size
        self.num_batches = -(-size // global_batch)
        self.num_samples = self.num_batches * self.per_rank
        self.total_size = self.num_batches * global_batch

    def __iter__(self):
        order = global_order(self.size, self.global_batch, self.seed, self.epoch)
        for start in range(0, len(order), self.global_batch):
            yield from order[start + self.rank:start + self.global_batch:self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
