"""``python -m stepsearch`` training entry points, run as a user would (subprocesses): help, the
quickstart config shortened by command-line overrides (bootstrap included) read back from MLflow,
and bad input reported as one ``error:`` line without a traceback."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from cli_runs import run_in_process
from training_fixtures import PYTHON, REPO, python_env, training_env  # noqa: F401  (fixtures)

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _run(args, cwd, timeout=240):
    env = python_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([PYTHON, "-m", "stepsearch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def test_top_level_and_fit_help(tmp_path):
    top = _run(["--help"], tmp_path)
    assert top.returncode == 0
    assert "fit" in top.stdout and "evaluate" in top.stdout
    fit = _run(["fit", "--help"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    for flag in ("--config", "--trainer.max_steps", "--model.ppo", "--model.bootstrap", "--data.world_dir"):
        assert flag in fit.stdout, flag


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart config, shortened: a small world, a tiny model made and warm-started on the
    spot (the bootstrap), 2 PPO iterations, MLflow in a sqlite file, everything under a temp dir."""
    tmp = tmp_path_factory.mktemp("quickstart")
    world = tmp / "world"
    overrides = {
        "data.world_dir": world, "data.world.num_people": 30, "data.world.num_places": 10,
        "data.world.num_regions": 4, "data.world.num_countries": 2, "data.world.num_orgs": 8,
        "data.world.num_works": 16, "data.world.train_size": 48, "data.world.val_size": 8, "data.world.test_size": 4,
        "data.batch_size": 4, "data.val_batch_size": 8, "data.max_val_examples": 8,
        "model.model.name_or_path": tmp / "sft",
        "model.bootstrap.tiny.out_dir": tmp / "tiny",
        "model.bootstrap.tiny.corpus_files": f"[{world / 'corpus.jsonl'},{world / 'train.jsonl'}]",
        "model.bootstrap.tiny.vocab_size": 512, "model.bootstrap.tiny.hidden_size": 32,
        "model.bootstrap.tiny.num_layers": 1, "model.bootstrap.tiny.num_heads": 2,
        "model.bootstrap.tiny.num_kv_heads": 1, "model.bootstrap.tiny.intermediate_size": 64,
        "model.bootstrap.warm_start.data": f"[{world / 'train.jsonl'}]",
        "model.bootstrap.warm_start.max_examples": 16, "model.bootstrap.warm_start.epochs": 1,
        "model.rollout.max_turns": 2, "model.rollout.max_response_tokens": 64,
        "model.rollout.max_context_tokens": 640,
        "model.ppo.mini_batch_size": 2, "model.ppo.micro_batch_size": 2, "model.log_samples_every_n_steps": 1,
        "trainer.max_steps": 2, "trainer.val_check_interval": 2, "trainer.default_root_dir": tmp / "root",
        "trainer.logger.init_args.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
        "trainer.enable_progress_bar": "false",
    }
    args = ["fit", "--config", str(QUICKSTART)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    proc = _run(args, cwd=tmp)
    return tmp, proc


def test_quickstart_fit_completes_and_prints_the_report(quickstart_run):
    tmp, proc = quickstart_run
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert "validation: before PPO (step 0) vs after" in proc.stdout
    assert any(line.startswith("│ val/em") for line in proc.stdout.splitlines())
    # The bootstrap made the world, the tiny model and the warm-started policy.
    assert (tmp / "world" / "index_bm25").is_dir()
    assert (tmp / "tiny" / "config.json").exists() and (tmp / "sft" / "warm_start.json").exists()
    assert [p.name for p in (tmp / "root").rglob("*.ckpt")] == ["iter-000002.ckpt"]


def test_quickstart_run_in_mlflow(quickstart_run):
    import mlflow

    tmp, proc = quickstart_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "steppo-seed0" and run.info.status == "FINISHED"  # named from its tags
    run_id = run.info.run_id
    for key in ("train/reward", "train/answer_f1", "train/info_gain", "train/redundancy", "train/key_score",
                "train/format_ok", "val/em", "val/f1", "val/reward"):
        assert key in run.data.metrics, key
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/reward")) == [0, 1]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/em")) == [0, 2]
    # The resolved config: artifact and flattened params, with the overrides applied.
    assert run.data.params["model.ppo.algorithm"] == "steppo"
    assert run.data.params["trainer.max_steps"] == "2"
    config = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(tmp / "dl"))))
    assert config["trainer"]["max_steps"] == 2
    assert config["model"]["model"]["name_or_path"] == str(tmp / "sft")
    top = {a.path for a in client.list_artifacts(run_id)}
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"config.yaml", "summary.md", "curves.png"} <= top
    assert {"samples/train_step00000.jsonl", "samples/train_step00000.html", "samples/val_step00002.jsonl"} <= samples


def test_missing_policy_without_bootstrap_is_one_error_line(training_env, tmp_path):
    missing = tmp_path / "missing" / "sft"
    proc = _run(["fit", "--model.model.name_or_path", str(missing), "--data.train", str(training_env.train),
                 "--data.val", str(training_env.val), "--data.retriever.index", str(training_env.index_dir),
                 "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--trainer.max_steps", "1"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    (line,) = _error_lines(proc)
    assert str(missing) in line and "does not exist" in line and "model.bootstrap" in line
    # The MLflow run existed when setup failed: it is FAILED (not left RUNNING), the error its tag.
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("StepSearchError: model.model.name_or_path") and str(missing) in run.data.tags["error"]


def test_unknown_algorithm_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(["fit", "--model.ppo.algorithm", "reinforce", "--trainer.logger", "false",
                                 "--trainer.max_steps", "1"], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if line.startswith("error:")]
    assert "model.ppo.algorithm" in line and "'reinforce'" in line


def test_bad_dataclass_value_in_the_config_is_one_error_line(tmp_path, capsys, monkeypatch):
    """jsonargparse builds the config's dataclasses while parsing and wraps a validation error of
    ours in its own ValueErrors (a traceback, before the fix); the CLI reports ours in one line."""
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(["fit", "--config", str(QUICKSTART), "--model.bootstrap.warm_start.guess_fraction",
                                 "1.5", "--trainer.logger", "false", "--trainer.max_steps", "1"], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if line.startswith("error:")]
    assert "warm_start.guess_fraction must be in [0, 1), got 1.5" in line


def test_misspelled_flag_is_refused_not_taken_as_its_prefix(tmp_path, capsys, monkeypatch):
    """argparse would take ``--trainer.max_step`` as ``--trainer.max_steps`` (prefix matching)."""
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(["fit", "--config", QUICKSTART, "--trainer.max_step", "3"], capsys, monkeypatch)
    assert code == 2
    assert "error: unknown option --trainer.max_step (did you mean --trainer.max_steps?)" in text
    assert "Traceback" not in text and "usage:" not in text


@pytest.mark.parametrize("flag, value, message", [
    ("--trainer.max_steps", "-5", "trainer.max_steps must be >= 1 for fit (got -5)"),
    ("--trainer.max_steps", "0", "0 would export the untrained policy"),
    ("--trainer.val_check_interval", "0", "trainer.val_check_interval must be >= 1, got 0"),
    ("--model.ppo.mini_batch_size", "0", "model.ppo.mini_batch_size must be >= 1, got 0"),
    ("--model.ppo.ppo_epochs", "-1", "model.ppo.ppo_epochs must be >= 1, got -1"),
    ("--data.batch_size", "0", "data.batch_size must be >= 1, got 0"),
    ("--trainer.devices", "0", "trainer.devices must be >= 1, got 0"),
])
def test_zero_or_negative_counts_are_one_error_line(tmp_path, capsys, monkeypatch, flag, value, message):
    monkeypatch.chdir(tmp_path)
    code, text = run_in_process(["fit", "--config", QUICKSTART, flag, value, "--trainer.logger", "false"], capsys, monkeypatch)
    assert code == 2
    assert "Traceback" not in text
    (line,) = [line for line in text.splitlines() if line.startswith("error:")]
    assert message in line


def test_one_seed_flag_gives_a_separate_complete_run(tmp_path, monkeypatch):
    """``--seed 3``: every seed of the quickstart (world, tiny model, warm-start, data order, rollouts,
    Lightning) is 3, every ``{seed}`` path (world, tiny model, warm-start) is seed3's, and the run
    directory is ``quickstart-steppo-seed3``; no other flag needed."""
    import sys

    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.training.module import StepSearchPPO
    from stepsearch.commands.fit import RunSession, SaveConfigCallback, StepSearchCLI, trainer_defaults
    from stepsearch.records.session import run_dir_of

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stepsearch"])
    session = RunSession()
    cli = StepSearchCLI(StepSearchPPO, StepSearchDataModule, args=["--config", str(QUICKSTART), "--seed", "3", "--trainer.max_steps", "1"],
                        run=False, save_config_callback=SaveConfigCallback, trainer_defaults=trainer_defaults(),
                        parser_kwargs={"allow_abbrev": False}, session=session)
    config = cli.config
    assert session.seed == 3 and config["seed_everything"] == 3
    assert cli.model.seed == 3 and cli.datamodule.seed == 3 and cli.datamodule.world.seed == 3
    assert cli.model.bootstrap.tiny.seed == 3 and cli.model.bootstrap.warm_start.seed == 3
    assert str(cli.datamodule.world_dir) == "runs/quickstart/seed3/world"
    assert cli.model.model_settings.name_or_path == "runs/quickstart/seed3/sft"
    assert cli.model.bootstrap.tiny.out_dir == "runs/quickstart/seed3/tiny"
    assert list(cli.model.bootstrap.tiny.corpus_files) == ["runs/quickstart/seed3/world/corpus.jsonl",
                                                           "runs/quickstart/seed3/world/train.jsonl"]
    assert list(cli.model.bootstrap.warm_start.data) == ["runs/quickstart/seed3/world/train.jsonl"]
    assert run_dir_of(config, session.seed, None) == tmp_path.joinpath("runs/quickstart/quickstart-steppo-seed3").relative_to(tmp_path)
    assert "{seed}" not in json.dumps(config.as_dict(), default=str)
