"""Which runs ``compare`` sets side by side, and what it must say about them.

:func:`select_runs` (experiments, run ids, an MLflow filter), :func:`group_runs` (by a param or tag),
:func:`split_running` (runs still ``RUNNING`` have no final value: left out, or counted and marked),
:func:`budget_notes` (runs whose final value stands at different PPO iterations, or on validation
sets of different sizes, do not compare: a warning names them), and :func:`store_warnings` (which
store is read; a local store that does not exist or holds no runs).
"""

from __future__ import annotations

import re

from stepsearch.errors import StepSearchError
from stepsearch.records.store import file_store_path, sqlite_path


def store_warnings(uri: str, missing_is_error: bool) -> tuple[str, list[str]]:
    """(the line naming the store, warnings) for a local store (sqlite file, file store folder): one
    that does not exist (an error for ``compare``, which would otherwise create it empty) or that holds
    no runs. A server's reachability is :func:`stepsearch.records.store.check_store`'s."""
    where = sqlite_path(uri) or file_store_path(uri)
    where = where.expanduser().resolve() if where is not None else None
    line = f"MLflow store: {uri}" + (f" ({where})" if where is not None and str(where) not in uri else "")
    if where is None:
        return line, []
    if not where.exists():
        hint = ("run from the directory you trained in, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) "
                "to the store the runs went to")
        if missing_is_error:
            raise StepSearchError(f"no MLflow store at {where} ({uri}): {hint}")
        return line, [f"{where} does not exist: a new, empty store is created there; {hint}"]
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments or not client.search_runs(experiments, max_results=1):
        return line, [f"the store {uri} holds no runs"]
    return line, []


def select_runs(client, experiments=(), run_ids=(), filter_string: str = "") -> list:
    """Runs of the named experiments (matching ``filter_string``) plus the given run ids, without repeats."""
    from mlflow.exceptions import MlflowException

    runs, seen = [], set()
    if experiments:
        ids = []
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
                raise StepSearchError(f"compare: no MLflow experiment named {name!r} in the store (experiments: {known})")
            ids.append(experiment.experiment_id)
        try:
            found = client.search_runs(ids, filter_string or "", max_results=5000)
        except MlflowException as err:
            raise StepSearchError(f"compare: bad --filter {filter_string!r}: {str(err).splitlines()[0]}") from None
        for run in found:
            if run.info.run_id not in seen:
                seen.add(run.info.run_id)
                runs.append(run)
    elif filter_string:
        all_ids = [e.experiment_id for e in client.search_experiments()]
        return select_runs(client, [client.get_experiment(i).name for i in all_ids], run_ids, filter_string)
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise StepSearchError(f"compare: run {run_id} does not exist in the store") from None
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            runs.append(run)
    if not runs:
        raise StepSearchError("compare: no runs selected (check --experiment/--run-id/--filter)")
    return runs


def group_value(run, key: str) -> str | None:
    """The run's value of a param or tag: ``tag.X``/``tags.X``, ``param.X``/``params.X``, or bare
    ``X`` (params first, then tags)."""
    match = re.match(r"(tags?|params?)\.(.+)", key)
    if match:
        source = run.data.tags if match.group(1).startswith("tag") else run.data.params
        return source.get(match.group(2))
    return run.data.params.get(key, run.data.tags.get(key))


def group_runs(runs, key: str) -> dict[str, list]:
    groups: dict[str, list] = {}
    for run in runs:
        value = group_value(run, key)
        groups.setdefault("(unset)" if value is None else value, []).append(run)
    if set(groups) == {"(unset)"}:
        sample = sorted(set(runs[0].data.params) | {f"tag.{t}" for t in runs[0].data.tags if not t.startswith("mlflow.")})
        raise StepSearchError(f"compare: no selected run has {key!r} (params/tags of the first run include: "
                              f"{', '.join(sample[:15])})")
    return groups


UNFINISHED = ("RUNNING", "SCHEDULED")


def split_running(runs, include_running: bool, notes: list[str]) -> list:
    """The runs to compare: unfinished ones dropped (a note names them) unless ``include_running``
    (a note marks them); an error when nothing finished is left."""
    running = [r for r in runs if r.info.status in UNFINISHED]
    if not running:
        return runs
    names = ", ".join(f"{r.info.run_name or r.info.run_id} ({r.info.run_id[:8]})" for r in running)
    if include_running:
        notes.append(f"{len(running)} run(s) still RUNNING are counted with their latest values: {names}")
        return runs
    kept = [r for r in runs if r.info.status not in UNFINISHED]
    if not kept:
        raise StepSearchError(f"compare: every selected run is still RUNNING ({names}); their last validation is not "
                              "final: wait for them, or pass --include-running to compare them as they are")
    notes.append(f"left out {len(running)} run(s) still RUNNING (last validation not final; --include-running "
                 f"counts them): {names}")
    return kept


def _val_questions(run) -> str:
    """The validation set size a run's params give: the smaller of ``data.max_val_examples`` and the
    generated world's ``data.world.val_size``; else the validation files."""
    params = run.data.params
    sizes = [int(v) for k in ("data.max_val_examples", "data.world.val_size") if str(v := params.get(k)).isdigit()]
    return f"{min(sizes)} questions" if sizes else params.get("data.val_files", "?")


def budget_notes(runs, curves: dict, keys: list[str]) -> list[str]:
    """A warning per budget the runs differ in: the PPO iteration of their final value (of ``val/em``,
    else the first metric), and the validation set."""
    final_key = "val/em" if "val/em" in keys else keys[0]
    budgets = {
        "PPO iterations": {r.info.run_id: str((curves[r.info.run_id].get(final_key) or [("?", None)])[-1][0])
                           for r in runs},
        "validation set": {r.info.run_id: _val_questions(r) for r in runs},
    }
    names = {r.info.run_id: r.info.run_name or r.info.run_id[:8] for r in runs}
    notes = []
    for what, by_run in budgets.items():
        values: dict[str, list[str]] = {}
        for run_id, value in by_run.items():
            values.setdefault(value, []).append(names[run_id])
        if len(values) > 1:
            parts = "; ".join(f"{value}: {', '.join(sorted(who))}" for value, who in sorted(values.items()))
            notes.append(f"the runs differ in {what} ({parts}): their final values do not compare")
    return notes
