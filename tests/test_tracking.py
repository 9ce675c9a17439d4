"""MLflow tracking helpers: sample-trajectory rows and HTML (mask shading), the before/after report,
and what reaches an MLflow run (read back with ``MlflowClient``)."""

from __future__ import annotations

import html
import json
import re

import pytest
from lightning.pytorch.loggers import MLFlowLogger
from training_fixtures import _one_thread, rollout_config, training_env  # noqa: F401  (fixtures)

from stepsearch.records.tracking import (
    default_tracking_uri,
    log_trajectory_samples,
    report_before_after,
    trajectory_html,
    trajectory_rows,
)


@pytest.fixture(scope="module")
def scripted_batch(training_env):
    """(tokenizer, trajectory, scores, examples): golden 2-hop trajectories plus one that never searches."""
    from stepsearch.data.sources import load_examples
    from stepsearch.models.loading import load_tokenizer
    from stepsearch.rewards import RewardConfig, score_trajectories
    from stepsearch.rollout.hf_engine import HFRolloutEngine
    from stepsearch.rollout.scripted import ScriptedPolicy
    from stepsearch.training.sft import golden_turns

    tokenizer = load_tokenizer(training_env.sft_dir)
    examples = [ex for ex in load_examples(training_env.train) if ex.num_hops == 2][:2]
    examples.append(load_examples(training_env.val)[0])
    scripts = [(ex.question, golden_turns(ex)) for ex in examples[:2]]
    scripts.append((examples[2].question, ["<answer> nobody </answer>"]))
    engine = HFRolloutEngine(ScriptedPolicy(tokenizer, scripts), tokenizer, training_env.retriever, rollout_config())
    trajectory = engine.generate([ex.question for ex in examples], greedy=True)
    scores = score_trajectories(trajectory.records, examples, RewardConfig())
    return tokenizer, trajectory, scores, examples


def _mlflow_logger(tmp_path, name="t"):
    return MLFlowLogger(experiment_name=name, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                        artifact_location=str(tmp_path / "artifacts"))


def _read_artifact(client, run_id, path, dst) -> str:
    with open(client.download_artifacts(run_id, path, str(dst))) as handle:
        return handle.read()


def test_trajectory_rows(scripted_batch):
    tokenizer, trajectory, scores, examples = scripted_batch
    rows = trajectory_rows(tokenizer, trajectory, scores, examples, limit=10)
    assert len(rows) == 3
    first = rows[0]
    assert first["id"] == examples[0].id and first["answers"] == examples[0].answers
    assert first["prediction"] == examples[0].answers[0] and first["answer_f1"] == 1.0 and first["format_ok"]
    assert [s["query"] for s in first["steps"]] == [sq.search_keys[0] for sq in examples[0].sub_questions]
    assert [s["info_gain"] for s in first["steps"]] == pytest.approx(scores[0].info_gains)
    assert all(len(s["passage_ids"]) == 3 for s in first["steps"])
    # No search: steps empty, no gains to pad; an answer without search still scores its F1.
    assert rows[2]["steps"] == [] and rows[2]["prediction"] == "nobody"
    json.dumps(rows)  # JSON-ready
    assert len(trajectory_rows(tokenizer, trajectory, scores, examples, limit=1)) == 1


def test_trajectory_html_shades_environment_tokens(scripted_batch):
    tokenizer, trajectory, scores, examples = scripted_batch
    rows = trajectory_rows(tokenizer, trajectory, scores, examples, limit=2)
    page = trajectory_html(tokenizer, trajectory, rows)
    assert page.count("<tr><td>") == 2
    cells = re.findall(r"<tr><td><pre>.*?</pre></td><td><pre>(.*?)</pre></td></tr>", page, flags=re.S)
    for b, cell in enumerate(cells):
        spans = re.findall(r"<span class='(pol|env)'>(.*?)</span>", cell, flags=re.S)
        policy = "".join(html.unescape(text) for kind, text in spans if kind == "pol")
        environment = "".join(html.unescape(text) for kind, text in spans if kind == "env")
        ids, mask = trajectory.input_ids[b], trajectory.loss_mask[b]
        start, end = int(trajectory.prompt_lengths[b]), int(trajectory.attention_mask[b].sum())
        assert policy == tokenizer.decode(ids[start:end][mask[start:end] == 1])
        assert environment.count("<information>") == 2 and "<information>" not in policy
        assert policy.count("<search>") == 2 and "<search>" not in environment
        # Spans alternate policy / environment and start with the policy's first turn.
        kinds = [kind for kind, _ in spans]
        assert kinds[0] == "pol" and all(a != b for a, b in zip(kinds, kinds[1:]))


def test_report_before_after_table_text():
    history = {"step0": {"val/em": 0.25, "val/f1": 0.5}, "last": {"val/em": 0.5, "val/f1": 0.375, "val/new": 1.0}}
    text = report_before_after(history, logger=None)
    assert text.splitlines() == [
        "| metric | step 0 | final | change |",
        "|---|---|---|---|",
        "| val/em | 0.250 | 0.500 | +0.250 |",
        "| val/f1 | 0.500 | 0.375 | -0.125 |",
        "| val/new |  | 1.000 |  |",
    ]


def test_samples_and_report_reach_the_mlflow_run(scripted_batch, tmp_path):
    import mlflow

    tokenizer, trajectory, scores, examples = scripted_batch
    logger = _mlflow_logger(tmp_path)
    logger.log_metrics({"val/em": 0.0, "train/reward": -1.0}, step=0)
    logger.log_metrics({"val/em": 0.5, "train/reward": 0.2}, step=3)
    log_trajectory_samples(logger, tokenizer, trajectory, scores, examples, "samples/val_step00003", limit=2)
    text = report_before_after({"step0": {"val/em": 0.0}, "last": {"val/em": 0.5}}, logger)
    client = mlflow.tracking.MlflowClient(logger._tracking_uri)
    names = {a.path for a in client.list_artifacts(logger.run_id)} | {
        a.path for a in client.list_artifacts(logger.run_id, "samples")}
    assert {"summary.md", "curves.png", "samples/val_step00003.jsonl", "samples/val_step00003.html"} <= names
    assert _read_artifact(client, logger.run_id, "summary.md", tmp_path / "dl") == text
    lines = _read_artifact(client, logger.run_id, "samples/val_step00003.jsonl", tmp_path / "dl").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [ex.id for ex in examples[:2]]


def test_non_mlflow_loggers_are_skipped(scripted_batch, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    tokenizer, trajectory, scores, examples = scripted_batch
    for logger in (None, CSVLogger(tmp_path)):
        log_trajectory_samples(logger, tokenizer, trajectory, scores, examples, "samples/x", limit=2)
        report_before_after({"step0": {"val/em": 0.0}, "last": {"val/em": 1.0}}, logger)
    assert not any(tmp_path.rglob("*.jsonl")) and not any(tmp_path.rglob("*.md"))


def test_default_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert default_tracking_uri() == "http://tracker:5000"


def test_logger_reads_the_environment_when_made(monkeypatch, tmp_path):
    from stepsearch.records.tracking import MLFlowLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert MLFlowLogger(experiment_name="x")._tracking_uri == f"sqlite:///{tmp_path}/env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MLFlowLogger(experiment_name="x")._tracking_uri == "sqlite:///mlflow.db"
    # No config of ours pins the store over the variable.
    from training_fixtures import REPO

    for path in [*REPO.glob("configs/**/*.yaml"), *REPO.glob("experiments/**/*.yaml")]:
        assert "tracking_uri" not in yaml_text(path), path


def yaml_text(path) -> str:
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


@pytest.mark.parametrize("algorithm, name, step_rewards", [("steppo", "steppo-seed3", True), ("ppo", "ppo-seed3", False),
                                                            ("grpo", "grpo-seed3", True)])
def test_effective_config_tags_and_run_name(algorithm, name, step_rewards, tmp_path):
    import mlflow

    from stepsearch.training.module import PPOSettings, StepSearchPPO
    from stepsearch.records.tracking import effective_settings, log_effective_config, run_name_from_tags, run_tags

    module = StepSearchPPO(ppo=PPOSettings(algorithm=algorithm), seed=3)
    tags = run_tags(module)
    assert tags["algorithm"] == algorithm and tags["seed"] == 3
    assert tags["step_rewards"] is step_rewards and tags["search_key_reward"] is step_rewards
    assert run_name_from_tags(tags) == name
    assert run_name_from_tags({**tags, "information_gain": False}) == (
        "ppo-seed3" if algorithm == "ppo" else f"{algorithm}-no_information_gain-seed3")
    # The config said step rewards on; the effective settings (what the module uses) win.
    flat = {"model.rewards.step_rewards": True, "model.ppo.algorithm": algorithm, "config": ["a.yaml"]}
    flat.update(effective_settings(module))
    assert flat["model.rewards.step_rewards"] is step_rewards
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("e"))
    log_effective_config(client, run.info.run_id, flat)
    params = client.get_run(run.info.run_id).data.params
    assert params["model.rewards.step_rewards"] == str(step_rewards) and "config" not in params


def test_lightning_hyperparameters_are_not_logged_twice(tmp_path):
    import mlflow

    from stepsearch.records.tracking import MLFlowLogger

    logger = MLFlowLogger(experiment_name="x", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    logger.log_hyperparams({"model": {"ppo": "PPOSettings(...)"}, "rollout": "RolloutConfig(...)"})
    assert mlflow.MlflowClient(logger._tracking_uri).get_run(logger.run_id).data.params == {}


def test_policy_settings_from_its_run_without_a_card(tmp_path, monkeypatch):
    from stepsearch.commands.evaluate import policy_rollout
    from stepsearch.records.tracking import MLFlowLogger, log_effective_config

    logger = MLFlowLogger(experiment_name="x", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    log_effective_config(logger.experiment, logger.run_id, {"model.rollout.template": "compact",
                                                            "model.rollout.max_turns": 4, "model.rollout.seed": None})
    (tmp_path / "policy").mkdir()
    logger.experiment.set_tag(logger.run_id, "policy_dir", str((tmp_path / "policy").resolve()))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logger._tracking_uri)
    config, card = policy_rollout(str(tmp_path / "policy"), {})
    assert (config.template, config.max_turns, config.seed) == ("compact", 4, None) and card["run_id"] == logger.run_id


def test_policy_card_and_curves(tmp_path):
    import mlflow

    from stepsearch.rollout.engine import RolloutConfig
    from stepsearch.commands.evaluate import policy_rollout
    from stepsearch.records.tracking import MLFlowLogger, _log_curves, log_policy_dir

    logger = MLFlowLogger(experiment_name="x", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    for step, (em, f1) in enumerate([(0.1, 0.1), (0.3, 0.3)]):  # EM equal to F1: both must still show
        logger.log_metrics({"val/em": em, "val/f1": f1, "train/reward": em - 1}, step=step)
    log_policy_dir(logger, tmp_path / "policy", RolloutConfig(template="compact", max_turns=4))
    config, card = policy_rollout(str(tmp_path / "policy"), {"max_turns": 2})
    assert config.template == "compact" and config.max_turns == 2 and card["run_id"] == logger.run_id
    client = mlflow.MlflowClient(logger._tracking_uri)
    assert client.get_run(logger.run_id).data.tags["policy_dir"] == str((tmp_path / "policy").resolve())
    import matplotlib.pyplot as plt

    figures = []
    real_log_figure = client.log_figure
    client.log_figure = lambda run_id, fig, name: (figures.append(fig), real_log_figure(run_id, fig, name))
    _log_curves(client, logger.run_id)
    (fig,) = figures
    left, right = fig.axes
    assert left.get_ylabel() and left.get_xlabel() == "PPO iteration" and fig._suptitle.get_text()
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in left.lines}
    assert set(styles) == {"EM", "F1"} and styles["EM"] != styles["F1"]
    assert [line.get_label() for line in right.lines] == ["reward"]
    plt.close("all")


def test_save_config_logs_what_the_module_uses_not_what_the_config_said(tmp_path):
    """The config says step rewards on; a PPO run forces them off: MLflow must record *off*, once,
    with the run tagged and named from the effective settings (through the callback Lightning calls)."""
    from types import SimpleNamespace

    import mlflow
    from jsonargparse import ArgumentParser

    from stepsearch.training.module import PPOSettings, StepSearchPPO
    from stepsearch.records.tracking import MLFlowLogger as StepSearchMLFlowLogger
    from stepsearch.records.tracking import MLflowSaveConfigCallback

    parser = ArgumentParser()
    parser.add_argument("--model.rewards.step_rewards", type=bool, default=True)
    parser.add_argument("--model.ppo.algorithm", type=str, default="steppo")
    config = parser.parse_args(["--model.ppo.algorithm", "ppo"])
    logger = StepSearchMLFlowLogger(experiment_name="x", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    module = StepSearchPPO(ppo=PPOSettings(algorithm="ppo"), seed=3)
    MLflowSaveConfigCallback(parser, config).save_config(SimpleNamespace(logger=logger), module, "fit")
    run = mlflow.MlflowClient(logger._tracking_uri).get_run(logger.run_id)
    assert run.data.params["model.rewards.step_rewards"] == "False"
    assert run.data.params["model.ppo.algorithm"] == "ppo"
    assert run.data.tags["algorithm"] == "ppo" and run.data.tags["mlflow.runName"] == "ppo-seed3"
