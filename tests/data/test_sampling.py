"""GlobalBatchSampler: the prompts of each PPO iteration do not depend on the number of ranks."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from stepsearch.data.sampling import GlobalBatchSampler
from stepsearch.errors import StepSearchError


def batches(size, global_batch, world, rank, epoch, seed=7):
    sampler = GlobalBatchSampler(size, global_batch, rank=rank, world_size=world, seed=seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(list(range(size)), batch_size=global_batch // world, sampler=sampler, collate_fn=list)
    return [list(b) for b in loader]


@pytest.mark.parametrize("size", [24, 22, 5])
def test_each_global_batch_is_the_same_for_any_number_of_ranks(size):
    for epoch in (0, 3):
        single = batches(size, 8, 1, 0, epoch)
        assert all(len(b) == 8 for b in single)  # the last batch is filled up, not short
        assert len(single) == -(-size // 8)
        flat = [i for b in single for i in b]
        assert set(flat) == set(range(size))  # nothing dropped
        assert len(set(flat[:size])) == size  # one permutation, then the fill from its start
        assert flat[size:] == (flat[:size] * 8)[:len(flat) - size]
        for world in (2, 4, 8):
            per_rank = [batches(size, 8, world, rank, epoch) for rank in range(world)]
            for k, whole in enumerate(single):
                # strided layout: local prompt j of rank r is global prompt j·W + r
                rebuilt = [per_rank[j % world][k][j // world] for j in range(8)]
                assert rebuilt == whole


def test_order_is_seeded_per_epoch():
    first, again = batches(24, 8, 1, 0, 0), batches(24, 8, 1, 0, 0)
    assert first == again
    assert batches(24, 8, 1, 0, 1) != first  # a new epoch draws a new order
    assert batches(24, 8, 1, 0, 0, seed=8) != first
    assert [i for b in first for i in b] != list(range(24))  # shuffled


def test_batch_size_must_divide_over_ranks():
    with pytest.raises(StepSearchError, match="data.batch_size=6 must be a positive multiple of the number of ranks"):
        GlobalBatchSampler(10, 6, rank=0, world_size=4)
    with pytest.raises(StepSearchError, match="no training examples"):
        GlobalBatchSampler(0, 4)
