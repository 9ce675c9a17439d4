"""MLflow tracking: the default logger, resolved config, sample trajectories, before/after report.

- ``default_tracking_uri()``: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working dir.
- ``MLflowSaveConfigCallback``: LightningCLI's config saver that also logs the resolved YAML as an
  artifact and its flattened keys as params, so runs can be compared on any setting.
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

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


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
        params = {k: str(v)[:500] for k, v in flat.items() if k not in ("config",)}
        trainer.logger.log_hyperparams(params)


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


def log_policy_dir(logger, path) -> None:
    """Record where the trained policy was written (MLflow tag ``policy_dir``)."""
    client, run_id = _mlflow_target(logger)
    if client is not None:
        client.set_tag(run_id, "policy_dir", str(Path(path).resolve()))


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


def _log_curves(client, run_id: str) -> None:
    """PNG of the validation and training curves of this run (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("val/em", "val EM"), ("val/f1", "val F1"), ("train/reward", "train reward"),
             ("train/answer_f1", "train answer F1")]
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for key, label in names:
        history = client.get_metric_history(run_id, key)
        if history:
            points = sorted((m.step, m.value) for m in history)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            plotted = True
    if not plotted:
        plt.close(fig)
        return
    ax.set_xlabel("PPO iteration")
    ax.legend()
    ax.grid(alpha=0.3)
    client.log_figure(run_id, fig, "curves.png")
    plt.close(fig)
