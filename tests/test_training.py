"""Lean log-probs: ``chunked_logprobs`` (hidden states at scored positions only, LM head +
log-softmax in chunks, temperature inside the chunk) against a float64 full-vocabulary reference, with
gradients, and entropy only as asked (differentiable, detached, or not at all)."""

from __future__ import annotations

import pytest
import torch

import stepsearch.models.policy as policy_module


def _reference(hidden, weight, labels, temperature):
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logprobs_match_float64_full_softmax_with_temperature(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 8, generator=g))
    labels = torch.randint(0, 50, (10,), generator=g)
    logp, entropy = policy_module.chunked_logprobs(hidden, head, labels, temperature=0.6, chunk_tokens=chunk,
                                                   entropy="grad")
    expected_logp, expected_entropy = _reference(hidden, head.weight, labels, 0.6)
    # float32 against float64: a logit is an 8-term dot product, log-softmax and entropy sum over 50
    # classes; each sum of n terms is off by at most n x eps relative (Higham's gamma_n), here of the
    # largest logit: the bound holds for any summation order a CPU's kernels pick.
    eps32, largest = torch.finfo(torch.float32).eps, float((hidden.detach() @ head.weight.T).abs().max()) / 0.6
    bound = eps32 * (8 + 50) * largest
    torch.testing.assert_close(logp.double(), expected_logp, rtol=0, atol=bound)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=bound)
    (logp.sum() + entropy.sum()).backward()  # recomputed chunks in backward: same gradient
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    ref_logp, ref_entropy = _reference(h64, w64, labels, 0.6)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    # Backward adds a sum over the 50 classes (hidden's gradient) and over the 10 rows (the head's),
    # on top of the forward's error, relative to the largest gradient.
    grad_bound = eps32 * (8 + 50 + 50 + 10) * largest
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=0, atol=grad_bound * float(h64.grad.abs().max()))
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=0,
                               atol=grad_bound * float(w64.grad.abs().max()))
    plain, _ = policy_module.chunked_logprobs(hidden.detach(), head, labels, temperature=1.0, chunk_tokens=chunk)
    assert not torch.allclose(plain, logp.detach())  # the temperature is applied


def test_entropy_is_detached_or_absent_unless_asked():
    hidden = torch.randn(4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20)
    labels = torch.randint(0, 20, (4,))
    logp, entropy = policy_module.chunked_logprobs(hidden, head, labels, entropy="detached")
    assert logp.requires_grad and not entropy.requires_grad
    assert policy_module.chunked_logprobs(hidden, head, labels)[1] is None
    with torch.no_grad():
        logp, entropy = policy_module.chunked_logprobs(hidden, head, labels, entropy="grad")
    assert not logp.requires_grad and not entropy.requires_grad
