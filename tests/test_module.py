"""``StepSearchPPO`` under a real Lightning Trainer: PPO-iteration step counting, MLflow records,
resume from a checkpoint, two-process DDP on CPU (gloo), the algorithm variants, LoRA, and the
guarantee that environment tokens get no policy gradient through the real stack."""

from __future__ import annotations

import json
import subprocess
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from training_fixtures import (  # noqa: F401  (fixtures)
    PYTHON,
    REPO,
    _one_thread,
    float32_update_bound,
    relative_update_difference,
    make_datamodule,
    make_module,
    python_env,
    rollout_config,
    training_env,
)

from stepsearch.ppo import core

TRAIN_METRICS = ("train/reward", "train/answer_f1", "train/info_gain", "train/redundancy", "train/key_score",
                 "train/format_ok")
VAL_METRICS = ("val/em", "val/f1", "val/reward")


def _trainer(root, max_steps, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root, num_sanity_val_steps=0,
                    log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                    check_val_every_n_epoch=None, val_check_interval=max_steps)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _changed(before, params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


def _adam_steps(optimizer) -> int:
    return int(max(float(state["step"]) for state in optimizer.state.values()))


def _metric_steps(client, run_id, key) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id, path=None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


class PlacedRecorder:
    """Wraps ``StepSearchPPO.ppo_update`` (and the module's scoring) to keep what each PPO iteration
    was given: (trajectory, placed rewards, trajectory scores)."""

    def __init__(self, monkeypatch):
        import stepsearch.training.module as module_file

        self.calls: list[tuple] = []
        original, original_score = module_file.StepSearchPPO.ppo_update, module_file.score_trajectories
        last_scores: list = []

        def scoring(*args, **kwargs):
            last_scores[:] = [original_score(*args, **kwargs)]
            return last_scores[0]

        def recording(module, trajectory, placed, num_prompts):
            self.calls.append((trajectory, placed.detach().clone(), last_scores[0]))
            return original(module, trajectory, placed, num_prompts)

        monkeypatch.setattr(module_file, "score_trajectories", scoring)
        monkeypatch.setattr(module_file.StepSearchPPO, "ppo_update", recording)


# ---------------------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def fitted(training_env, tmp_path_factory):
    """Two PPO iterations (batch 4, minibatch 2, 2 PPO epochs: 4 optimizer steps per iteration),
    validation at step 0 and after the last iteration, MLflow in a sqlite store, last checkpoint kept."""
    root = tmp_path_factory.mktemp("fit")
    uri = f"sqlite:///{root}/mlflow.db"
    logger = MLFlowLogger(experiment_name="test-fit", tracking_uri=uri, artifact_location=str(root / "artifacts"))
    module = make_module(training_env, log_samples_every_n_steps=1, num_logged_samples=3)
    module.configure_model()
    ac = module.actor_critic
    before = {"actor": _snapshot(ac.actor_parameters()), "critic": _snapshot(ac.critic_parameters()),
              "reference": _snapshot(ac.reference.parameters())}
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = _trainer(root, 2, logger=logger, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, make_datamodule(training_env))
    return dict(trainer=trainer, module=module, logger=logger, uri=uri, root=root, before=before,
                last=root / "ckpt" / "last.ckpt")


def test_fit_counts_ppo_iterations_not_optimizer_steps(fitted):
    trainer, module = fitted["trainer"], fitted["module"]
    assert trainer.global_step == 2
    actor_opt, critic_opt = trainer.optimizers
    # 2 iterations x 2 PPO epochs x (4 trajectories / minibatch 2) = 8 AdamW steps per optimizer.
    assert _adam_steps(actor_opt) == 8
    assert _adam_steps(critic_opt) == 8
    ac = module.actor_critic
    assert _changed(fitted["before"]["actor"], ac.actor_parameters())
    assert _changed(fitted["before"]["critic"], ac.critic_parameters())
    assert not _changed(fitted["before"]["reference"], ac.reference.parameters())
    # The checkpoint is named by PPO iteration too.
    assert (fitted["root"] / "ckpt" / "epoch=0-step=2.ckpt").exists()


def test_fit_logs_metrics_and_artifacts_to_mlflow(fitted):
    import mlflow

    client = mlflow.tracking.MlflowClient(fitted["uri"])
    run_id = fitted["logger"].run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in TRAIN_METRICS + VAL_METRICS:
        assert key in run.data.metrics, key
    # Train metrics at each PPO iteration; validation before any update (0) and after both (2).
    assert _metric_steps(client, run_id, "train/reward") == [0, 1]
    assert _metric_steps(client, run_id, "val/em") == [0, 2]
    for key in ("train/format_ok", "val/em", "val/f1"):
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run_id, key))
    assert all(-1.0 <= m.value for m in client.get_metric_history(run_id, "train/reward"))
    history = fitted["module"].history  # what the before/after table reports
    assert set(history) == {"step0", "last"}
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val/f1")}
    assert history["step0"]["val/f1"] == pytest.approx(logged[0]) and history["last"]["val/f1"] == pytest.approx(logged[2])

    names = set(_artifacts(client, run_id))
    expected = {"summary.md", "curves.png"} | {f"samples/train_step0000{i}.{ext}" for i in (0, 1) for ext in ("jsonl", "html")}
    expected |= {f"samples/val_step00002.{ext}" for ext in ("jsonl", "html")}
    assert expected <= names
    local = client.download_artifacts(run_id, "samples/train_step00000.jsonl", str(fitted["root"] / "dl"))
    rows = [json.loads(line) for line in open(local)]
    assert len(rows) == 3
    assert {"question", "answers", "prediction", "steps", "global_score", "response"} <= set(rows[0])
    summary = open(client.download_artifacts(run_id, "summary.md", str(fitted["root"] / "dl"))).read()
    assert summary.startswith("| metric | step 0 | final | change |")
    assert "| val/em |" in summary and "| val/f1 |" in summary


def test_fit_writes_the_trained_policy_in_hugging_face_format(fitted):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fitted["root"] / "policy"  # beside the checkpoint folder (root / "ckpt")
    run = mlflow.tracking.MlflowClient(fitted["uri"]).get_run(fitted["logger"].run_id)
    assert run.data.tags["policy_dir"] == str(out.resolve())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == fitted["module"].actor_critic.tokenizer.get_vocab()
    trained = dict(fitted["module"].actor_critic.policy.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name].detach().cpu()), name  # the trained weights, not the initial ones


def test_resume_from_last_checkpoint_runs_one_more_iteration(fitted, training_env):
    root = fitted["root"] / "resume"
    uri = f"sqlite:///{root}/mlflow.db"
    root.mkdir()
    logger = MLFlowLogger(experiment_name="test-resume", tracking_uri=uri, artifact_location=str(root / "artifacts"))
    # Resuming loads with weights_only=True: the settings dataclasses must be allow-listed.
    saved = torch.load(fitted["last"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    module = make_module(training_env, log_samples_every_n_steps=0)
    trainer = _trainer(root, 3, logger=logger, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, make_datamodule(training_env), ckpt_path=str(fitted["last"]))
    assert trainer.global_step == 3
    # Optimizer state came back from the checkpoint and moved on by one iteration (4 AdamW steps).
    actor_opt, critic_opt = trainer.optimizers
    assert _adam_steps(actor_opt) == 12 and _adam_steps(critic_opt) == 12
    resumed = module.state_dict()
    policy_keys = [k for k in saved["state_dict"] if k.startswith("actor_critic.policy.")]
    assert any(not torch.equal(saved["state_dict"][k], resumed[k]) for k in policy_keys)
    # The frozen reference is not checkpointed: the resumed run rebuilt it from the policy's source.
    assert not [k for k in saved["state_dict"] if ".reference" in k]
    from stepsearch.models.loading import load_policy

    source, _ = load_policy(training_env.sft_dir, device="cpu")
    rebuilt = dict(module.actor_critic.reference.named_parameters())
    assert all(torch.equal(p, rebuilt[n]) for n, p in source.named_parameters())
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    assert _metric_steps(client, logger.run_id, "train/reward") == [2]
    assert _metric_steps(client, logger.run_id, "val/em") == []  # no step-0 pass on resume


# ------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import lightning as L
    import torch

    sys.path.insert(0, {tests!r})
    import training_fixtures as tf
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.models.policy import PolicySettings
    from stepsearch.training.module import OptimSettings, PPOSettings, StepSearchPPO
    from stepsearch.retrieval.factory import RetrieverConfig
    from stepsearch.training.sharding import FSDP2Strategy

    torch.set_num_threads(1)
    out, strategy, devices, steps = Path({out!r}), {strategy!r}, {devices}, {steps}


    class Recorded(StepSearchDataModule):
        """Keeps every rollout's tokens by question (this rank's share of each iteration)."""

        rows = []

        def rollout(self, examples, **kwargs):
            trajectory = super().rollout(examples, **kwargs)
            for b, ex in enumerate(examples):
                length = int(trajectory.attention_mask[b].sum())
                self.rows.append([self.trainer.global_step, ex.id, trajectory.input_ids[b, :length].tolist()])
            return trajectory


    class DumpParameters(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
            params = {{name: full(p.detach()).clone() for name, p in module.actor_critic.named_parameters()}}
            if trainer.global_rank == 0:
                torch.save(params, out / f"params_step{{trainer.global_step}}.pt")


    module = StepSearchPPO(
        model=PolicySettings(name_or_path={policy!r}), rollout=tf.rollout_config(),
        ppo=PPOSettings(ppo_epochs=1, mini_batch_size=2, micro_batch_size=1),
        optim=OptimSettings(actor_lr=1e-3, critic_lr=1e-3, actor_warmup_ratio=0.0, critic_warmup_ratio=0.0),
        log_samples_every_n_steps=0)
    data = Recorded(train={train!r}, retriever=RetrieverConfig(kind="bm25", index={index!r}), batch_size=4, seed=0)
    # FSDP2: a checkpoint after each iteration (its state dict reshards the weights the first rollout
    # gathered; the second rollout must gather them again).
    checkpoints = [L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1)]
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy=FSDP2Strategy() if strategy == "fsdp" else strategy,
                        max_steps=steps, logger=False, callbacks=checkpoints + [DumpParameters()],
                        enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    trainer.fit(module, data)
    (out / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(
        {{"global_step": trainer.global_step, "world_size": trainer.world_size, "rows": data.rows}}))
''')


def _fit_in_subprocess(env, out, strategy, devices, steps):
    out.mkdir()
    script = out / "fit.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), out=str(out), policy=str(env.sft_dir),
                                        train=str(env.train), index=str(env.index_dir), strategy=strategy,
                                        devices=devices, steps=steps))
    proc = subprocess.run([PYTHON, str(script)], cwd=out, env=python_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.fixture(scope="module")
def one_process_fit(training_env, tmp_path_factory):
    """The reference for the 2-process fits: 1 process × 4 prompts, two PPO iterations."""
    out = tmp_path_factory.mktemp("one_process") / "fit"
    return out, _fit_in_subprocess(training_env, out, "auto", 1, 2)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_processes_fit_like_one_with_real_rollouts(training_env, tmp_path, one_process_fit, strategy):
    """Lightning's subprocess launcher (gloo), DDP or FSDP2, real rollouts (FSDP2: generation with the
    gathered policy weights, a checkpoint between iterations). 2 processes × 2 prompts per iteration
    sample exactly the trajectories of 1 process × 4 prompts (same prompts per iteration, sampling
    seeded per question and iteration) and end each iteration with its parameters."""
    from stepsearch.models.policy import ActorCritic, PolicySettings

    single_dir, single = one_process_fit
    steps = 2 if strategy == "fsdp" else 1
    ranks = _fit_in_subprocess(training_env, tmp_path / "fit", strategy, 2, steps)
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step in range(steps):
        expected = sorted((ex_id, ids) for it, ex_id, ids in single["rows"] if it == step)
        got = sorted((ex_id, ids) for r in ranks for it, ex_id, ids in r["rows"] if it == step)
        assert len(expected) == 4 and got == expected
        # the strided layout: rank r holds prompts r and r + 2 of the iteration's global batch
        order = [ex_id for it, ex_id, _ in single["rows"] if it == step]
        assert [ex_id for it, ex_id, _ in ranks[1]["rows"] if it == step] == order[1::2]
    start = dict(ActorCritic(PolicySettings(name_or_path=str(training_env.sft_dir))).named_parameters())
    for step in range(1, steps + 1):
        want = torch.load(single_dir / f"params_step{step}.pt", weights_only=True)
        got = torch.load(tmp_path / "fit" / f"params_step{step}.pt", weights_only=True)
        assert want.keys() == got.keys()
        # Two ranks sum their halves' gradients in another order: float32 rounding only, within 2 runs
        # x 2 (Adam) x the bound of 2 rows of up to max_context_tokens over 2 optimizer steps per
        # iteration, relative to the update (not a fixed 1e-6 of the parameters: issue 20).
        names = sorted(want)
        config = ActorCritic(PolicySettings(name_or_path=str(training_env.sft_dir))).policy.config
        bound = 4 * float32_update_bound(config, tokens=2 * rollout_config().max_context_tokens, steps=2 * step)
        assert relative_update_difference([got[k] for k in names], [want[k] for k in names],
                                          [start[k] for k in names]) <= bound
    moved = [name for name, p in got.items() if not torch.equal(p, start[name].detach())]
    assert any(name.startswith("policy.") for name in moved)
    assert any(name.startswith("critic.") for name in moved)
    assert not any(name.startswith("reference.") for name in moved)


# ------------------------------------------------------------------------------ algorithms


def _fit_one(env, tmp_path, **module_kwargs):
    module = make_module(env, log_samples_every_n_steps=0, **module_kwargs)
    module.configure_model()
    trainer = _trainer(tmp_path, 1, logger=False, enable_checkpointing=False, limit_val_batches=0)
    return module, trainer


def test_ppo_baseline_places_only_the_global_reward(training_env, tmp_path, monkeypatch):
    recorder = PlacedRecorder(monkeypatch)
    module, trainer = _fit_one(training_env, tmp_path, ppo={"algorithm": "ppo"})
    cfg = module.reward_config
    assert not (cfg.step_rewards or cfg.search_key_reward or cfg.information_gain or cfg.redundancy_penalty)
    trainer.fit(module, make_datamodule(training_env, val=None))
    assert trainer.global_step == 1
    (trajectory, placed, scores), = recorder.calls
    last = trajectory.last_token_index.cpu()
    expected = torch.zeros_like(placed)
    expected[torch.arange(len(scores)), last] = torch.tensor([s.global_score for s in scores])
    assert torch.equal(placed.cpu(), expected)
    # Global reward only: R = answer F1 when the format is valid (no search-key term), else -1.
    assert all(s.global_score == (s.answer_f1 if s.format_ok else -1.0) for s in scores)
    assert all(s.step_scores == [] for s in scores)


def test_steppo_places_step_scores_only_at_search_ends(training_env, tmp_path, monkeypatch):
    recorder = PlacedRecorder(monkeypatch)
    module, trainer = _fit_one(training_env, tmp_path, ppo={"ppo_epochs": 1})
    trainer.fit(module, make_datamodule(training_env, val=None))
    (trajectory, placed, scores), = recorder.calls
    last = trajectory.last_token_index.tolist()
    for b, score in enumerate(scores):
        allowed = {last[b]} | {step.end_index for step in trajectory.records[b].steps}
        nonzero = set(placed[b].nonzero().flatten().tolist())
        assert nonzero <= allowed
        expected_last = score.global_score + sum(
            s * module.reward_config.step_reward_scale
            for step, s in zip(trajectory.records[b].steps, score.step_scores) if step.end_index == last[b])
        assert placed[b, last[b]].item() == pytest.approx(expected_last, abs=1e-6)


def test_grpo_updates_the_actor_and_leaves_the_critic(training_env, tmp_path, monkeypatch):
    recorder = PlacedRecorder(monkeypatch)
    module, trainer = _fit_one(training_env, tmp_path, ppo={"algorithm": "grpo", "grpo_group_size": 2,
                                                            "mini_batch_size": 2, "micro_batch_size": 2})
    ac = module.actor_critic
    actor, critic = _snapshot(ac.actor_parameters()), _snapshot(ac.critic_parameters())
    trainer.fit(module, make_datamodule(training_env, batch_size=2))
    assert module.history == {}  # limit_val_batches=0 also skips the step-0 validation
    (trajectory, _, _), = recorder.calls
    assert len(trajectory) == 4  # 2 prompts x group of 2
    assert _changed(actor, ac.actor_parameters())
    assert not _changed(critic, ac.critic_parameters())
    metrics = trainer.callback_metrics
    assert "train/kl_loss" in metrics and "train/value_loss" not in metrics
    assert "train/critic_grad_norm" not in metrics


def test_shared_critic_trains_the_value_head_with_the_policy(training_env, tmp_path):
    module, trainer = _fit_one(training_env, tmp_path, model={"critic": "shared"}, ppo={"ppo_epochs": 1})
    ac = module.actor_critic
    assert ac.shared_critic and ac.critic is None and ac.critic_parameters() == []
    head = _snapshot(ac.value_head.parameters())
    trainer.fit(module, make_datamodule(training_env, val=None))
    assert len(trainer.optimizers) == 1
    assert module.history == {}  # no validation data: no step-0 pass, no empty before/after table
    assert _changed(head, ac.value_head.parameters())
    assert "train/value_loss" in trainer.callback_metrics


def test_lora_reference_is_the_base_with_adapters_disabled(training_env, tmp_path):
    from stepsearch.models.policy import LoraSettings

    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    module, trainer = _fit_one(training_env, tmp_path, model={"critic": "shared", "lora": lora},
                               ppo={"ppo_epochs": 1}, optim={"actor_lr": 1e-2})
    ac = module.actor_critic
    assert ac.reference is None and ac.uses_lora
    base = {n: p.detach().clone() for n, p in ac.policy.named_parameters() if "lora_" not in n}
    lora_params = {n: p.detach().clone() for n, p in ac.policy.named_parameters() if "lora_" in n}
    assert lora_params and all(not ac.policy.get_parameter(n).requires_grad for n in base)
    ids = ac.tokenizer(["Question: Where was Elbimar Thravane born?\n<search> born"], return_tensors="pt")
    with torch.no_grad():
        # LoRA B starts at zero: before training, policy and reference agree exactly.
        assert torch.equal(ac.policy_forward(ids.input_ids, ids.attention_mask)[0],
                           ac.reference_logits(ids.input_ids, ids.attention_mask))
    trainer.fit(module, make_datamodule(training_env, val=None))
    after = dict(ac.policy.named_parameters())
    assert all(torch.equal(value, after[name]) for name, value in base.items())
    assert any(not torch.equal(value, after[name]) for name, value in lora_params.items())
    with torch.no_grad():
        policy_logits = ac.policy_forward(ids.input_ids, ids.attention_mask)[0]
        reference_logits = ac.reference_logits(ids.input_ids, ids.attention_mask)
    assert not torch.allclose(policy_logits, reference_logits)
    # The reference is the untouched base: adapters off gives what the base model gave before.
    from stepsearch.models.loading import load_policy

    plain, _ = load_policy(training_env.sft_dir, device="cpu")
    with torch.no_grad():
        expected = plain(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits[:, :-1]
    torch.testing.assert_close(reference_logits, expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- gradient masking


def test_environment_tokens_get_no_policy_or_value_gradient(training_env):
    from stepsearch.data.sources import load_examples
    from stepsearch.models.policy import ActorCritic, PolicySettings
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.scripted import ScriptedPolicy
    from stepsearch.training.sft import golden_turns

    ac = ActorCritic(PolicySettings(name_or_path=str(training_env.sft_dir), critic="shared"))
    tokenizer = ac.tokenizer
    examples = [ex for ex in load_examples(training_env.train) if ex.num_hops == 2][:2]
    scripted = ScriptedPolicy(tokenizer, [(ex.question, golden_turns(ex)) for ex in examples])
    engine = HFRolloutEngine(scripted, tokenizer, training_env.retriever, rollout_config())
    trajectory = engine.generate([ex.question for ex in examples], greedy=True)
    assert all(len(rec.steps) == 2 and rec.answer == ex.answers[0] for rec, ex in zip(trajectory.records, examples))

    ids, attn = trajectory.input_ids, trajectory.attention_mask
    target_mask = trajectory.loss_mask[:, 1:].bool()
    positions = torch.arange(ids.shape[1])
    response = ((positions[None, :] >= trajectory.prompt_lengths[:, None]) & attn.bool())[:, 1:]
    observation = response & ~target_mask
    assert observation.sum() > 20  # two <information> blocks per row

    logits, values = ac.policy_forward(ids, attn)
    logits.retain_grad()
    values.retain_grad()
    logp = core.logprobs_from_logits(logits, ids[:, 1:])
    generator = torch.Generator().manual_seed(0)
    advantages = 1.0 + torch.rand(logp.shape, generator=generator)  # nonzero everywhere, masked or not
    old_logp = logp.detach() + 0.05 * torch.randn(logp.shape, generator=generator)
    pg_loss, _ = core.policy_loss(logp, old_logp, advantages, target_mask)
    returns = torch.randn(values.shape, generator=generator) + 3.0
    v_loss, _ = core.value_loss(values, values.detach() + 0.1, returns, target_mask)
    (pg_loss + v_loss).backward()

    logit_grad = logits.grad.abs().sum(-1)  # [B, L-1]
    assert torch.all(logit_grad[~target_mask] == 0)
    assert torch.all(values.grad[~target_mask] == 0)
    assert (logit_grad[target_mask] > 0).float().mean() > 0.9
    assert (values.grad[target_mask] != 0).float().mean() > 0.9


def test_gradient_checkpointing_is_used_by_ppo_forwards(training_env):
    """Hugging Face layers checkpoint only in train mode: the policy and critic must be in train mode
    (dropout off) for PPO's forwards, also after the engine generated with the policy in eval mode."""
    from stepsearch.data.sources import load_examples
    from stepsearch.models.policy import ActorCritic, PolicySettings
    from stepsearch.rollout.hf_engine import HFRolloutEngine

    ac = ActorCritic(PolicySettings(name_or_path=str(training_env.sft_dir), gradient_checkpointing=True))
    plain = ActorCritic(PolicySettings(name_or_path=str(training_env.sft_dir)))
    plain.critic.load_state_dict(ac.critic.state_dict())  # the value head is freshly initialised
    questions = [ex.question for ex in load_examples(training_env.val)[:2]]
    engine = HFRolloutEngine(ac.generation_model(), ac.tokenizer, training_env.retriever,
                             rollout_config(max_turns=1, max_response_tokens=8))
    trajectory = engine.generate(questions, seed=0)
    assert ac.policy.training and ac.critic.trunk.training
    assert all(m.p == 0.0 for m in ac.modules() if isinstance(m, torch.nn.Dropout))

    runs: list[str] = []
    for name, layer in (("policy", ac.policy.model.layers[0]), ("critic", ac.critic.trunk.layers[0])):
        checkpoint = layer._gradient_checkpointing_func

        def counting(fn, *args, _checkpoint=checkpoint, _name=name, **kwargs):
            def inner(*a, **k):
                runs.append(_name)
                return fn(*a, **k)
            return _checkpoint(inner, *args, **kwargs)

        layer._gradient_checkpointing_func = counting

    ids, attn = trajectory.input_ids, trajectory.attention_mask
    grads = []
    for model in (ac, plain):
        logits, _ = model.policy_forward(ids, attn)
        values = model.critic_values(ids, attn)
        (core.logprobs_from_logits(logits, ids[:, 1:]).mean() + values.square().mean()).backward()
        grads.append([p.grad for p in model.actor_parameters() + model.critic_parameters()])
    # Each checkpointed layer ran twice: in the forward and again in the backward (recompute).
    assert sorted(runs) == ["critic", "critic", "policy", "policy"]
    for checkpointed, reference in zip(*grads):
        torch.testing.assert_close(checkpointed, reference, rtol=1e-4, atol=1e-6)


def test_skipped_steps_count_survives_a_checkpoint(monkeypatch):
    """``train/skipped_steps`` is a running count: a resumed run continues it, never restarts at 0."""
    from types import SimpleNamespace

    import stepsearch.training.module
    from stepsearch.training.module import StepSearchPPO

    monkeypatch.setattr(stepsearch.training.module, "all_rng_states", lambda trainer: [])
    before = StepSearchPPO()
    before._trainer = SimpleNamespace(global_step=5, world_size=1, global_rank=0)
    before.skipped_steps = 3
    checkpoint: dict = {}
    before.on_save_checkpoint(checkpoint)
    after = StepSearchPPO()
    after._trainer = SimpleNamespace(global_step=5, world_size=1, global_rank=0)
    after.on_load_checkpoint(checkpoint)
    assert after.skipped_steps == 3
