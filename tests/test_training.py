"""score_batch: log-probs are those of the sampling distribution softmax(logits / T)."""

from __future__ import annotations

import torch

from stepsearch.rollout.trajectory import Trajectory, TrajectoryRecord
from stepsearch.training import score_batch


class FixedLogits:
    """A stand-in actor-critic whose policy and reference return fixed logits."""

    def __init__(self, logits: torch.Tensor, ref_logits: torch.Tensor):
        self.logits, self.ref_logits = logits, ref_logits

    def policy_forward(self, ids, attn):
        return self.logits[: ids.shape[0], : ids.shape[1] - 1], None

    def reference_logits(self, ids, attn):
        return self.ref_logits[: ids.shape[0], : ids.shape[1] - 1]

    def critic_values(self, ids, attn):
        return torch.zeros(ids.shape[0], ids.shape[1] - 1)


def test_score_batch_uses_temperature_scaled_log_probs():
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab, temperature = 2, 5, 7, 0.6
    logits = torch.randn(batch, length - 1, vocab, generator=gen)
    ref_logits = torch.randn(batch, length - 1, vocab, generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    trajectory = Trajectory(
        input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids),
        prompt_lengths=torch.tensor([1, 1]), records=[TrajectoryRecord("", "", None) for _ in range(batch)],
    )
    old, ref, values = score_batch(FixedLogits(logits, ref_logits), trajectory, micro_batch_size=batch,
                                   need_values=True, temperature=temperature)
    for b in range(batch):
        for j in range(length - 1):
            row = logits[b, j].double() / temperature
            expected = row[ids[b, j + 1]] - torch.logsumexp(row, 0)
            assert abs(float(old[b, j]) - float(expected)) < 1e-5
            ref_row = ref_logits[b, j].double() / temperature
            assert abs(float(ref[b, j]) - float(ref_row[ids[b, j + 1]] - torch.logsumexp(ref_row, 0))) < 1e-5
    assert values.shape == (batch, length - 1)
    # and T = 1 differs: the test would fail if the scaling were dropped
    plain, _, _ = score_batch(FixedLogits(logits, ref_logits), trajectory, batch, False, temperature=1.0)
    assert not torch.allclose(plain, old)
