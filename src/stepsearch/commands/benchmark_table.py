"""The benchmark table of ``python -m stepsearch evaluate`` (:mod:`stepsearch.commands.evaluate`): Markdown
and CSV, the terminal table, and its MLflow records (``test/<benchmark>/em|f1`` per method/model run, the
table and predictions as artifacts; optionally also into the run that trained the policy)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def format_table(rows: list[dict], benchmarks: list[str], notes: list[str]) -> tuple[str, str]:
    """(Markdown, CSV) of the benchmark table: EM/F1 per benchmark and the unweighted average."""
    head = ["method", "model"] + [f"{b} {m}" for b in benchmarks for m in ("EM", "F1")] + ["avg EM", "avg F1"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv = [",".join(head)]
    for row in rows:
        cells = [row["method"], row["model"]]
        for b in benchmarks:
            cells += [f"{row['scores'][b]['em']:.3f}", f"{row['scores'][b]['f1']:.3f}"]
        cells += [f"{row['avg_em']:.3f}", f"{row['avg_f1']:.3f}"]
        md.append("| " + " | ".join(cells) + " |")
        csv.append(",".join(cells))
    if notes:
        md += ["", *(f"- {n}" for n in notes)]
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def mlflow_log(suite, row: dict, card: dict, md: str, csv: str, predictions: Path) -> None:
    import mlflow

    from stepsearch.records.tracking import default_tracking_uri  # lazy: loads lightning

    uri = card.get("tracking_uri") if suite.log_to_policy_run and card.get("run_id") else default_tracking_uri()
    client = mlflow.MlflowClient(uri)
    metrics = {f"test/{b}/{k}": s[k] for b, s in row["scores"].items() for k in ("em", "f1")}
    metrics.update({"test/avg/em": row["avg_em"], "test/avg/f1": row["avg_f1"]})
    experiment = client.get_experiment_by_name(suite.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(suite.experiment)
    run = client.create_run(experiment_id, run_name=f"{row['method']}-{row['model']}",
                            tags={"method": row["method"], "model": row["model"], "kind": "evaluation"})
    targets = [run.info.run_id] + ([card["run_id"]] if suite.log_to_policy_run and card.get("run_id") else [])
    for run_id in targets:
        prefix = "" if run_id == run.info.run_id else f"{row['method']}/"
        for key, value in metrics.items():
            client.log_metric(run_id, key.replace("test/", f"test/{prefix}", 1), value)
        client.log_text(run_id, md, f"{prefix}benchmark_table.md")
    client.log_text(run.info.run_id, csv, "benchmark_table.csv")
    client.log_artifact(run.info.run_id, str(predictions), "predictions")
    client.log_param(run.info.run_id, "suite", json.dumps(asdict(suite))[:6000])
    client.set_terminated(run.info.run_id)


def print_table(rows, benchmarks, notes, console) -> None:
    from rich.table import Table

    table = Table(title="EM / F1 (greedy)", caption="\n".join(notes))
    for column in ["method", "model", *benchmarks, "average"]:
        table.add_column(column, justify="left" if column in ("method", "model") else "right")
    for row in rows:
        cells = [f"{row['scores'][b]['em']:.3f} / {row['scores'][b]['f1']:.3f}" for b in benchmarks]
        table.add_row(row["method"], row["model"], *cells, f"{row['avg_em']:.3f} / {row['avg_f1']:.3f}")
    console.print(table)
