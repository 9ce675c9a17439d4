"""MLflow tracking: the default logger, effective config, tags, sample trajectories, reports, ``ui``.

- ``default_tracking_uri()``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working dir.
- ``MLFlowLogger``: Lightning's, with the store resolved when the logger is made (so
  ``MLFLOW_TRACKING_URI`` overrides it; configs name no URI) and hyperparameters logged once, by
  the callback below, instead of a second time under Lightning's names.
- ``MLflowSaveConfigCallback``: LightningCLI's config saver that logs the resolved YAML as an
  artifact and the *effective* flattened config as params (the reward switches as the algorithm
  leaves them: PPO forces the step and key rewards off), tags ``algorithm``, ``seed`` and the reward
  switches, and names the run from them (``steppo-seed0``, ``ppo-seed1``) unless a run name is set.
- ``log_policy_dir``: tag ``policy_dir`` and write ``stepsearch_policy.json`` beside the exported
  policy (rollout settings, MLflow run), which ``evaluate``/``ask`` read.
- ``python -m stepsearch ui`` (:mod:`stepsearch.commands.compare`) opens the same store's runs.
- ``log_trajectory_samples``: a JSONL of sample trajectories plus an HTML page where environment
  tokens (loss mask 0) are shaded, so masks can be checked by eye.
- ``report_before_after``: prints step-0 vs last validation metrics as a table and logs it.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger

from stepsearch import lightning_adapter
from stepsearch.ppo.registry import ALGORITHMS
from stepsearch.records.policy_card import POLICY_CARD

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REWARD_SWITCHES = ("step_rewards", "information_gain", "redundancy_penalty", "search_key_reward")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's MLflow logger; ``tracking_uri`` defaults to :func:`default_tracking_uri` at
    construction (Lightning's default reads the variable at import, and else writes ``./mlruns``).
    Hyperparameters are logged once, as the effective config, by :class:`MLflowSaveConfigCallback`."""

    def __init__(self, experiment_name: str = "stepsearch", run_name: str | None = None,
                 tracking_uri: str | None = None, **kwargs):
        super().__init__(experiment_name=experiment_name, run_name=run_name,
                         tracking_uri=tracking_uri or default_tracking_uri(), **kwargs)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Ignored: Lightning would log the module's and datamodule's init args under second names."""


def _mlflow_target(logger):
    """(client, run_id) of an MLFlowLogger, or (None, None) for other loggers."""
    if logger is None or type(logger).__name__ != "MLFlowLogger":
        return None, None
    return logger.experiment, logger.run_id


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


class MLflowSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run and into MLflow (artifact + flattened params)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning's version insists on a log directory, which MLflow (sqlite store) has none of.
        if self.already_saved:
            return
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        client, run_id = _mlflow_target(trainer.logger)
        if client is None:
            from pathlib import Path

            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, log_dir / self.config_filename, skip_none=False, overwrite=True,
                             multifile=self.multifile)
            return
        text = self.parser.dump(self.config, skip_none=False)
        client.log_text(run_id, text, "config.yaml")
        flat: dict = {}
        _flatten("", self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config), flat)
        flat.update(effective_settings(pl_module))
        log_effective_config(client, run_id, flat)
        tags = run_tags(pl_module)
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        if not lightning_adapter.mlflow_run_name(trainer.logger):
            client.set_tag(run_id, "mlflow.runName", run_name_from_tags(tags))


def effective_settings(pl_module) -> dict:
    """``model.rewards.*`` and ``model.ppo.algorithm`` as the module uses them (PPO forces the step
    and key rewards off, whatever the config says)."""
    from dataclasses import asdict

    out = {}
    if getattr(pl_module, "reward_config", None) is not None:
        out.update({f"model.rewards.{k}": v for k, v in asdict(pl_module.reward_config).items()})
    if getattr(pl_module, "ppo", None) is not None:
        out["model.ppo.algorithm"] = pl_module.ppo.algorithm
    return out


def log_effective_config(client, run_id: str, flat: dict) -> None:
    """Each setting once, as an MLflow param (batches of 100, values cut at MLflow's 6000 chars)."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items()) if k != "config"]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def run_tags(pl_module) -> dict:
    """``algorithm``, ``seed`` and the effective reward switches of a ``StepSearchPPO``."""
    tags = {"algorithm": getattr(getattr(pl_module, "ppo", None), "algorithm", "unknown"),
            "seed": getattr(pl_module, "seed", "")}
    rewards = getattr(pl_module, "reward_config", None)
    for switch in REWARD_SWITCHES:
        if rewards is not None:
            tags[switch] = bool(getattr(rewards, switch))
    return tags


def run_name_from_tags(tags: dict) -> str:
    """``{algorithm}[-no_{switch}...]-seed{S}``: switches named only where the config turns one off, not
    where the algorithm forces them (PPO's step rewards are off by definition)."""
    spec = ALGORITHMS.get(tags["algorithm"])
    forced = spec is not None and spec.rewards is not None
    off = [] if forced else [f"no_{s}" for s in REWARD_SWITCHES if tags.get(s) is False]
    return "-".join([tags["algorithm"], *off, f"seed{tags['seed']}"])


def trajectory_rows(tokenizer, trajectory, scores, examples, limit: int) -> list[dict]:
    """Readable per-trajectory rows: question, gold, answer, searches with retrieved ids, scores."""
    rows = []
    for b in range(min(limit, len(trajectory))):
        rec, score, ex = trajectory.records[b], scores[b], examples[b]
        rows.append({
            "id": ex.id, "dataset": ex.dataset, "question": ex.question, "answers": ex.answers,
            "prediction": score.answer, "format_ok": score.format_ok, "answer_f1": score.answer_f1,
            "key_score": score.key_score, "global_score": score.global_score,
            "steps": [{"query": s.query, "passage_ids": s.passage_ids, "end_index": s.end_index,
                       "info_gain": ig, "redundancy": rp}
                      for s, ig, rp in zip(rec.steps, _pad(score.info_gains, len(rec.steps)),
                                           _pad(score.redundancies, len(rec.steps)))],
            "invalid_actions": rec.invalid_actions, "num_turns": rec.num_turns,
            "response": rec.response_text,
        })
    return rows


def _pad(values, n):
    values = list(values or [])
    return values + [None] * (n - len(values))


def trajectory_html(tokenizer, trajectory, rows: list[dict]) -> str:
    """HTML page: each response token shown; environment tokens (mask 0) shaded grey."""
    parts = ["<html><head><meta charset='utf-8'><style>body{font-family:sans-serif}"
             ".env{background:#ddd;color:#555}.pol{background:#e6ffe6}pre{white-space:pre-wrap}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}</style></head><body>",
             "<p>Green: policy tokens (loss mask 1). Grey: environment tokens (mask 0).</p><table>",
             "<tr><th>question / gold / prediction / scores</th><th>response</th></tr>"]
    for b, row in enumerate(rows):
        start = int(trajectory.prompt_lengths[b])
        end = int(trajectory.attention_mask[b].sum())
        ids = trajectory.input_ids[b, start:end].tolist()
        mask = trajectory.loss_mask[b, start:end].tolist()
        spans, current, current_mask = [], [], None
        for token, m in zip(ids, mask):
            if current and m != current_mask:
                spans.append((current_mask, current))
                current = []
            current.append(token)
            current_mask = m
        if current:
            spans.append((current_mask, current))
        body = "".join(
            f"<span class='{'pol' if m else 'env'}'>{html.escape(tokenizer.decode(toks))}</span>" for m, toks in spans)
        meta = html.escape(json.dumps({k: row[k] for k in ("question", "answers", "prediction", "answer_f1",
                                                           "key_score", "global_score")}, indent=1))
        parts.append(f"<tr><td><pre>{meta}</pre></td><td><pre>{body}</pre></td></tr>")
    parts.append("</table></body></html>")
    return "".join(parts)


def log_trajectory_samples(logger, tokenizer, trajectory, scores, examples, name: str, limit: int) -> None:
    """Log ``{name}.jsonl`` and ``{name}.html`` to the MLflow run (no-op for other loggers)."""
    client, run_id = _mlflow_target(logger)
    if client is None or limit <= 0:
        return
    rows = trajectory_rows(tokenizer, trajectory, scores, examples, limit)
    client.log_text(run_id, "\n".join(json.dumps(r) for r in rows) + "\n", f"{name}.jsonl")
    client.log_text(run_id, trajectory_html(tokenizer, trajectory, rows), f"{name}.html")


def log_policy_dir(logger, path, rollout=None) -> None:
    """Record where the trained policy was written (MLflow tag ``policy_dir``) and write its card,
    ``stepsearch_policy.json`` (rollout settings, MLflow run), for ``evaluate`` and ``ask``."""
    from dataclasses import asdict

    client, run_id = _mlflow_target(logger)
    card: dict = {"rollout": asdict(rollout) if rollout is not None else {}}
    if client is not None:
        client.set_tag(run_id, "policy_dir", str(Path(path).resolve()))
        card.update(run_id=run_id, tracking_uri=lightning_adapter.mlflow_tracking_uri(logger),
                    experiment_id=client.get_run(run_id).info.experiment_id)
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / POLICY_CARD).write_text(json.dumps(card, indent=1) + "\n")


def report_before_after(history: dict[str, dict[str, float]], logger) -> str:
    """Print step-0 vs final validation metrics as a table; log it as ``summary.md``. Returns the text."""
    from rich.console import Console
    from rich.table import Table

    before, after = history.get("step0", {}), history.get("last", {})
    keys = sorted(set(before) | set(after))
    table = Table(title="validation: before PPO (step 0) vs after")
    for column in ("metric", "step 0", "final", "change"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    lines = ["| metric | step 0 | final | change |", "|---|---|---|---|"]
    for key in keys:
        b, a = before.get(key), after.get(key)
        delta = f"{a - b:+.3f}" if a is not None and b is not None else ""
        cells = (key, "" if b is None else f"{b:.3f}", "" if a is None else f"{a:.3f}", delta)
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    text = "\n".join(lines) + "\n"
    client, run_id = _mlflow_target(logger)
    if client is not None:
        client.log_text(run_id, text, "summary.md")
        _log_curves(client, run_id)
    return text


CURVE_PANELS = (
    ("validation (greedy)", "score", (("val/em", "EM", "-", "o"), ("val/f1", "F1", "--", "s"))),
    ("training (sampled)", "mean per trajectory", (("train/reward", "reward", "-", "o"),
                                                   ("train/answer_f1", "answer F1", "--", "s"))),
)


def _log_curves(client, run_id: str) -> None:
    """``curves.png``: validation EM and F1 (left) and training reward and answer F1 (right) against
    PPO iteration; distinct line styles and markers so equal series stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    plotted = False
    for ax, (title, ylabel, series) in zip(axes, CURVE_PANELS):
        for key, label, style, marker in series:
            history = client.get_metric_history(run_id, key)
            if history:
                points = sorted((m.step, m.value) for m in history)
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style, marker=marker,
                        markersize=4, markerfacecolor="none" if style == "--" else None, label=label)
                plotted = True
        ax.set(title=title, xlabel="PPO iteration", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(frameon=False)
    if not plotted:
        plt.close(fig)
        return
    fig.suptitle(client.get_run(run_id).info.run_name or run_id)
    client.log_figure(run_id, fig, "curves.png")
    plt.close(fig)
