"""The PPO update under real strategies on 2 CPU processes (gloo), against one process.

A fixed synthetic rollout batch of 8 prompts stands in for the rollouts (a stub ``training_step``
hands each rank its rows; the sampler's strided layout: rank r holds prompts r, r+2, …), so what is
compared is exactly the update: global whitening, global token-mean, gradients summed over
micro-batches and ranks (DDP: one flat all-reduce; FSDP2: reduce-scatter of a world-scaled loss).

- rank invariance: 2 × 4 prompts and 1 × 8 prompts give the same parameters after one PPO
  iteration, under DDP and under FSDP2 (``FSDP2Strategy``, ``fully_shard`` per decoder layer);
- FSDP2 resume: a new run resumed from the (distributed, one shard per rank) checkpoint of iteration
  1 ends iteration 2 with the parameters of the uninterrupted run; the reference is rebuilt from the
  policy's source (it is not in the checkpoint), the same.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
from training_fixtures import (PYTHON, REPO, _one_thread, float32_update_bound, python_env,  # noqa: F401
                               relative_update_difference, tiny_model_dir)

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, {tests!r})
    import training_fixtures as tf
    from stepsearch.models.policy import PolicySettings
    from stepsearch.training.module import OptimSettings, PPOSettings, StepSearchPPO
    from stepsearch.training.sharding import FSDP2Strategy, check_strategy_and_sizes

    torch.set_num_threads(1)
    out, strategy, devices, max_steps = Path({out!r}), {strategy!r}, {devices}, {max_steps}
    TRAJECTORY, PLACED = tf.synthetic_trajectory(8, 24, 300, seed=5)


    class Data(L.LightningDataModule):
        batch_size = 8  # global prompts per iteration

        def train_dataloader(self):  # the strided layout of an unshuffled DistributedSampler
            world, rank = self.trainer.world_size, self.trainer.global_rank
            return DataLoader(list(range(8))[rank::world], batch_size=8 // world, shuffle=False)


    class FixedRollouts(StepSearchPPO):
        """StepSearchPPO with the rollout replaced by this rank's rows of the fixed batch."""

        def setup(self, stage):
            self.per_rank = check_strategy_and_sizes(self, stage)
            self.configure_model()

        def training_step(self, batch, batch_idx):
            rows = torch.as_tensor(batch)
            iteration = self.trainer.global_step
            trajectory = TRAJECTORY.__class__(TRAJECTORY.input_ids[rows], TRAJECTORY.attention_mask[rows],
                                              TRAJECTORY.loss_mask[rows], TRAJECTORY.prompt_lengths[rows],
                                              [TRAJECTORY.records[i] for i in rows.tolist()])
            self.ppo_update(trajectory.to(self.device), PLACED[rows].to(self.device), len(rows))
            self._count_one_iteration(iteration)
            dump(self, f"params_step{{iteration + 1}}")


    def dump(module, name):
        params = {{}}
        for key, p in module.actor_critic.named_parameters():
            p = p.detach()
            params[key] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
        ref = {{k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for k, p in module.actor_critic.reference.named_parameters()}}
        if module.global_rank == 0:
            torch.save({{"params": params, "reference": ref}}, out / f"{{name}}.pt")


    module = FixedRollouts(
        model=PolicySettings(name_or_path={policy!r}), rollout=tf.rollout_config(),
        ppo=PPOSettings(ppo_epochs=2, mini_batch_size=4, micro_batch_size=1, entropy_coef=0.01),
        optim=OptimSettings(actor_lr=1e-3, critic_lr=1e-3, actor_warmup_ratio=0.0, critic_warmup_ratio=0.0),
        log_samples_every_n_steps=0)
    kwargs = dict(strategy=FSDP2Strategy() if strategy == "fsdp" else strategy)
    callbacks = []
    if {save!r}:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1,
                                                             save_top_k=-1, filename="iter-{{step}}"))
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=max_steps, logger=False,
                        enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, default_root_dir=out, **kwargs)
    trainer.fit(module, Data(), ckpt_path={ckpt!r})
    assert trainer.global_step == max_steps
''')


def _run(tmp_path, name, policy, *, strategy, devices, max_steps=1, save=False, ckpt=None):
    out = tmp_path / name
    out.mkdir()
    script = out / "run.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), out=str(out), strategy=strategy, devices=devices,
                                    max_steps=max_steps, policy=str(policy), save=save, ckpt=ckpt))
    proc = subprocess.run([PYTHON, str(script)], cwd=out, env=python_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(out, step):
    return torch.load(out / f"params_step{step}.pt", weights_only=True)


def _assert_same(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[k].flatten().double() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten().double() for k in sorted(b)])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) <= rtol


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    policy = tiny_model_dir(tmp_path_factory.getbasetemp())
    return dict(tmp=tmp, policy=policy, single=_run(tmp, "single", policy, strategy="auto", devices=1))


def test_one_process_update_moves_the_weights(runs):
    from stepsearch.models.policy import ActorCritic, PolicySettings

    start = dict(ActorCritic(PolicySettings(name_or_path=str(runs["policy"])), seed=0).named_parameters())
    after = _load(runs["single"], 1)["params"]
    moved = sum(int((after[k] != start[k].detach()).sum()) for k in after)
    assert moved > 0.9 * sum(p.numel() for p in after.values())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(runs, strategy):
    fsdp = strategy == "fsdp"  # FSDP2 runs on to iteration 2, with checkpoints, for the resume test
    two = _run(runs["tmp"], f"two_{strategy}", runs["policy"], strategy=strategy, devices=2,
               max_steps=2 if fsdp else 1, save=fsdp)
    single = _load(runs["single"], 1)["params"]
    from stepsearch.models.policy import ActorCritic, PolicySettings

    start = ActorCritic(PolicySettings(name_or_path=str(runs["policy"])), seed=0)
    got = _load(two, 1)["params"]
    # Two ranks sum their halves' gradients in another order than one rank: float32 rounding only,
    # within 2 runs x 2 (Adam) x the bound of 4 rows x 24 tokens over 2 epochs x 2 minibatches,
    # relative to the update (issue 20: a fixed 1e-6 of the parameters stood on one CPU's rounding).
    bound = 4 * float32_update_bound(start.policy.config, tokens=4 * 24, steps=2 * 2)
    names = sorted(single)
    start_params = dict(start.named_parameters())
    assert relative_update_difference([got[k] for k in names], [single[k] for k in names],
                                      [start_params[k] for k in names]) <= bound
    runs[f"two_{strategy}"] = two


def test_fsdp2_resume_equals_uninterrupted_run(runs):
    uninterrupted = runs.get("two_fsdp")
    if uninterrupted is None:
        pytest.skip("needs the FSDP2 run of test_two_ranks_match_one_rank")
    checkpoint = uninterrupted / "ckpt" / "iter-step=1.ckpt"  # the run went on; this one resumes from it
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    metadata = torch.load(checkpoint / "meta.pt", weights_only=False)
    assert metadata["global_step"] == 1
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.actor_critic.policy.") for k in keys)
    assert not any("reference" in k for k in keys)
    resumed = _run(runs["tmp"], "fsdp_resumed", runs["policy"], strategy="fsdp", devices=2, max_steps=2,
                   ckpt=str(checkpoint))
    expected, got = _load(uninterrupted, 2), _load(resumed, 2)
    _assert_same(expected["params"], got["params"], rtol=1e-7)
    _assert_same(expected["reference"], got["reference"], rtol=0.0)
