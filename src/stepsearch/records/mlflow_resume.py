"""A resumed ``fit`` logs into the MLflow run its ``run.json`` records (``stepsearch.records.runs``).

LightningCLI builds the MLflow logger before the run directory is known; :func:`attach_recorded_run`
points it at the recorded run before it starts one (``stepsearch.lightning_adapter``), after checking
that the store holds that run. Params are not logged again (MLflow refuses changed params; the first
process logged them), and each (metric, step) the killed process logged is logged once (``LogOnce``).
"""

from __future__ import annotations

from stepsearch import lightning_adapter
from stepsearch.errors import StepSearchError
from stepsearch.records.runs import LogOnce


def attach_recorded_run(trainer, run_id: str) -> bool:
    """Log into MLflow run ``run_id``: no new run, no params re-logged. ``False``: not an MLflow logger."""
    logger = trainer.logger
    if type(logger).__name__ != "MLFlowLogger":
        return False
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = lightning_adapter.mlflow_tracking_uri(logger)
    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise StepSearchError(f"run.json names MLflow run {run_id}, which the store {uri} does not "
                              "hold: resume with the same trainer.logger settings") from None
    lightning_adapter.attach_mlflow_run(logger, run_id)
    logger.log_hyperparams = lambda *args, **kwargs: None
    if trainer.is_global_zero:
        logger.log_metrics = LogOnce(logger, MlflowClient(uri), run_id)
    return True
