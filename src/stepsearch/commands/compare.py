"""``python -m stepsearch compare``: runs side by side from an MLflow store; ``ui``: the store's runs.

``compare`` selects runs (experiment names, run ids, and/or an MLflow filter string), groups them by
a param or tag (``model.ppo.algorithm``, ``tag.algorithm``, ``model.rewards.step_rewards``), and for
every validation metric (overall, per dataset, per hop; searches per question, reward, answer F1)
and the training reward, answer F1 and searches reports the **final** value (the run's last logged step) and the **best**
(maximum over its validations; for validation scores only) as mean ± sample standard deviation over the group's runs,
with the number of runs. It prints the table, writes it as ``compare.md`` and ``compare.csv``, and
draws ``compare.png``: validation EM, training reward and training answer F1 against PPO iteration, one colour per group,
a thin line per run and a thick line for the group mean. Works on any tracking URI
(``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; ``--tracking-uri`` overrides).

A group of one run shows its bare value (no ``± 0.000``). Runs still ``RUNNING`` are left out (their
last validation is not final; ``--include-running`` counts them, marked), and a warning names runs
whose budgets differ (PPO iterations of the final value, validation questions), since their finals
do not compare. ``compare`` and ``ui`` say which store they read; ``compare`` refuses a local store
that does not exist (instead of creating an empty one), ``ui`` warns that it is new, and both warn
when it holds no runs.

``ui`` starts ``mlflow ui`` on the same store and prints, per experiment, the URL of its runs table in
the "Model training" view (MLflow 3 opens experiments in its GenAI view, where no run is listed).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from stepsearch.commands.run_selection import budget_notes, group_runs, select_runs, split_running, store_warnings
from stepsearch.errors import StepSearchError
from stepsearch.records.store import check_store, check_writable

SCORE_SUFFIXES = ("/em", "/f1", "/answer_f1")
CURVES = (("val/em", "validation EM (greedy)"), ("train/reward", "training reward (sampled, algorithm's own)"),
          ("train/answer_f1", "training answer F1 (sampled, comparable)"))
TRAIN_KEYS = ("train/reward", "train/answer_f1", "train/searches")


def tracking_uri(explicit: str | None = None) -> str:
    from stepsearch.records.tracking import default_tracking_uri  # lazy: loads lightning, torch, transformers

    return explicit or default_tracking_uri()


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n−1; 0 for one run) and n."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def metric_keys(runs) -> list[str]:
    """Validation metrics (overall first, then per dataset and per hop), then the training reward,
    answer F1 and searches."""
    keys = {k for run in runs for k in run.data.metrics if k.startswith("val/")}

    def order(key: str):
        depth = key.count("/")
        return (depth, "hops_" in key, key)

    return sorted(keys, key=order) + [k for k in TRAIN_KEYS if any(k in r.data.metrics for r in runs)]


def histories(client, runs, keys) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id -> metric -> [(step, value)] sorted by step (the last value logged at a step wins)."""
    out: dict = {}
    for run in runs:
        per_key = {}
        for key in keys:
            points: dict[int, tuple[int, float]] = {}
            for m in client.get_metric_history(run.info.run_id, key):
                if m.step not in points or m.timestamp >= points[m.step][0]:
                    points[m.step] = (m.timestamp, m.value)
            per_key[key] = sorted((step, value) for step, (_, value) in points.items())
        out[run.info.run_id] = per_key
    return out


def summarize(groups: dict[str, list], curves: dict, keys: list[str]) -> list[dict]:
    """One row per metric: per group, (mean, std, n) of the final value and of the best value."""
    rows = []
    for key in keys:
        row = {"metric": key, "final": {}, "best": {}}
        for name, runs in groups.items():
            finals = [curves[r.info.run_id][key][-1][1] for r in runs if curves[r.info.run_id][key]]
            bests = [max(v for _, v in curves[r.info.run_id][key]) for r in runs if curves[r.info.run_id][key]]
            row["final"][name] = mean_std(finals) if finals else None
            scored = key.startswith("val/") and key.endswith(SCORE_SUFFIXES)  # best of validations, not of noisy batches
            row["best"][name] = mean_std(bests) if bests and scored else None
        rows.append(row)
    return rows


def _cell(stat) -> str:
    if stat is None:
        return ""
    return f"{stat[0]:.3f}" if stat[2] == 1 else f"{stat[0]:.3f} ± {stat[1]:.3f}"  # one run has no spread


def format_markdown(rows: list[dict], groups: dict[str, list], group_by: str, notes=()) -> str:
    names = list(groups)
    head = ["metric"] + [f"{n} final" for n in names] + [f"{n} best" for n in names]
    lines = [f"Grouped by `{group_by}`: " + ", ".join(f"{n} (n={len(groups[n])})" for n in names)
             + ". Mean ± sample std over runs (a bare value: one run); final = last validation, best = max over "
             "validations.", *(f"\n**Warning:** {note}." for note in notes), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["metric"]] + [_cell(row["final"][n]) for n in names] + [_cell(row["best"][n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict], groups: dict[str, list]) -> str:
    lines = ["metric,group,n,final_mean,final_std,best_mean,best_std"]
    for row in rows:
        for name in groups:
            final, best = row["final"][name], row["best"][name]
            if final is None:
                continue
            best_cells = f"{best[0]:.6f},{_std(best)}" if best else ","
            lines.append(f"{row['metric']},{name},{final[2]},{final[0]:.6f},{_std(final)},{best_cells}")
    return "\n".join(lines) + "\n"


def _std(stat) -> str:
    return f"{stat[1]:.6f}" if stat[2] > 1 else ""  # one run: no spread, an empty cell


def plot_curves(groups: dict[str, list], curves: dict, path: Path, title: str) -> Path:
    """``compare.png``: one panel per CURVES metric; a colour per group, thin line per run, thick mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves_drawn = [(key, label) for key, label in CURVES if any(curves[r.info.run_id].get(key) for g in groups.values() for r in g)]
    fig, axes = plt.subplots(1, len(curves_drawn), figsize=(5.2 * len(curves_drawn), 4.2), constrained_layout=True,
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[0], curves_drawn):
        for index, (name, runs) in enumerate(groups.items()):
            colour = colours(index % 10)
            by_step: dict[int, list[float]] = {}
            for run in runs:
                points = curves[run.info.run_id].get(key) or []
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, linewidth=0.8, alpha=0.45)
                for step, value in points:
                    by_step.setdefault(step, []).append(value)
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], color=colour, linewidth=2.4,
                        marker="o" if key.startswith("val/") else None, markersize=4, label=f"{name} (n={len(runs)})")
        ax.set(xlabel="PPO iteration", ylabel=label.split(" (")[0], title=label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(frameon=False, fontsize=9)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def compare(uri: str, experiments=(), run_ids=(), filter_string: str = "", group_by: str = "tag.algorithm",
            out_dir: str | Path = "runs/compare", include_running: bool = False,
            notes: list[str] | None = None) -> tuple[list[dict], dict[str, list], str]:
    """Select, group, summarise; write compare.md/.csv/.png under ``out_dir``. Returns (rows, groups,
    Markdown); warnings (runs left out, budgets that differ) go into ``notes`` and the Markdown."""
    import mlflow

    check_store(uri, write=False)  # seconds, one line: not minutes of HTTP retries
    check_writable(out_dir, "compare --out")
    client = mlflow.MlflowClient(uri)
    notes = [] if notes is None else notes
    runs = split_running(select_runs(client, experiments, run_ids, filter_string), include_running, notes)
    groups = dict(sorted(group_runs(runs, group_by).items()))
    keys = metric_keys(runs)
    if not keys:
        raise StepSearchError("compare: the selected runs logged no val/ or train/reward metrics")
    curves = histories(client, runs, keys)
    notes += budget_notes(runs, curves, keys)
    rows = summarize(groups, curves, keys)
    md = format_markdown(rows, groups, group_by, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.csv").write_text(format_csv(rows, groups))
    title = f"{', '.join(experiments) or 'selected runs'}: grouped by {group_by}"
    plot_curves(groups, curves, out / "compare.png", title)
    return rows, groups, md


def configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", action="append", default=[], help="MLflow experiment name (repeatable)")
    parser.add_argument("--run-id", action="append", default=[], help="a run id (repeatable)")
    parser.add_argument("--filter", default="", help="MLflow filter, e.g. \"params.`model.ppo.epochs` = '2'\"")
    parser.add_argument("--group-by", default="tag.algorithm",
                        help="param or tag to group by: tag.algorithm (default), model.ppo.algorithm, tag.step_rewards ...")
    parser.add_argument("--out", default="runs/compare", help="where compare.md/.csv/.png go")
    parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--include-running", action="store_true",
                        help="count runs still RUNNING with their latest values (default: leave them out)")


def run_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if not (args.experiment or args.run_id or args.filter):
        raise StepSearchError("compare: select runs with --experiment NAME, --run-id ID or --filter EXPR")
    uri = tracking_uri(args.tracking_uri)
    _print_notes(*store_warnings(uri, missing_is_error=True))
    notes: list[str] = []
    rows, groups, _ = compare(uri, args.experiment, args.run_id, args.filter, args.group_by, args.out,
                              include_running=args.include_running, notes=notes)
    _print_notes("", notes)
    names = list(groups)
    table = Table(title=f"grouped by {args.group_by}: mean ± std (n runs)",
                  caption="final = last logged value; best = max over the run's validations")
    table.add_column("metric")
    for name in names:
        table.add_column(f"{name} final (n={len(groups[name])})", justify="right")
    for name in names:
        table.add_column(f"{name} best", justify="right")
    for row in rows:
        table.add_row(row["metric"], *[_cell(row["final"][n]) for n in names], *[_cell(row["best"][n]) for n in names])
    Console(width=max(160, 20 + 34 * len(names))).print(table)
    out = Path(args.out)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0


def configure_ui(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--print-only", action="store_true", help="print the runs URLs; do not start the server")


def runs_urls(uri: str, host: str, port: int) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs table in the "Model training" view), per experiment."""
    import mlflow

    return [(e.name, f"http://{host}:{port}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in mlflow.MlflowClient(uri).search_experiments()]


def run_ui(args: argparse.Namespace) -> int:
    import shutil
    import sys

    uri = tracking_uri(args.tracking_uri)

    check_store(uri, write=False)
    _print_notes(*store_warnings(uri, missing_is_error=False))
    for name, url in runs_urls(uri, args.host, args.port):
        print(f"{name}: {url}")
    if args.print_only:
        return 0
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    print(f"starting mlflow ui on {uri} (Ctrl-C stops it)")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)])
    return 0


def _print_notes(line: str, warnings: list[str]) -> None:
    import sys

    if line:
        print(line, flush=True)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
