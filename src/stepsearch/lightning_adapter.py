"""Every private Lightning (and torch FSDP2) attribute StepSearch touches, in one place.

Everything else in the package uses public API only; ``tests/test_lightning_adapter.py`` has one
test per function below that fails when the installed Lightning/torch changes the internal it
relies on, and a test that scans ``src/`` for private attribute access outside this module.
Checked against Lightning 2.6.6 and torch 2.13.0 (``pyproject.toml`` pins torch; Lightning >= 2.4).

What has no public equivalent, and why it is needed (``docs/decisions.md``, "Lightning internals"):

- the train-step metrics flush (:func:`flush_train_step_metrics`): an iteration's metrics must reach
  the loggers before its checkpoint is written (Lightning logs them after ``on_train_batch_end``,
  where checkpoints are saved);
- ``ModelCheckpoint``'s memory of its last save (:func:`last_checkpoint_saved`,
  :func:`mark_checkpoint_saved`): a signal's checkpoint and the scheduled one of the same iteration
  are one file, not two;
- the cluster environment (:func:`cluster_environment`): SLURM auto-requeue on one device, where the
  strategy holds none;
- the MLflow logger's store, run name and run (:func:`mlflow_tracking_uri`, :func:`mlflow_run_name`,
  :func:`mlflow_run_started`, :func:`attach_mlflow_run`): a resumed run logs into the recorded run,
  and nothing may create a run by asking;
- ``ModelParallelStrategy``'s data-parallel size (:func:`set_data_parallel_size`): pure FSDP2 over
  every rank, which its ``"auto"`` (= number of nodes) does not give;
- FSDP2's root lazy init (:func:`fsdp_lazy_init`, torch): generation gathers the layers with
  ``unshard()``, which does not run it.

Imports only Lightning and torch (a foundation module).
"""

from __future__ import annotations

CHECKED_AGAINST = {"lightning": "2.6.6", "torch": "2.13.0"}


# ------------------------------------------------------------------------------------- trainer

def flush_train_step_metrics(trainer) -> None:
    """Send the current training step's ``self.log`` metrics to the loggers now.

    Touches ``trainer._logger_connector.update_train_step_metrics()`` (Lightning calls it itself after
    ``on_train_batch_end``; calling it earlier logs the same metrics at the same step, honouring
    ``log_every_n_steps``; the later repeat is dropped by ``records.runs.LogOnce``). No public API
    logs the step's metrics before the batch-end hooks, where checkpoints are written.
    """
    trainer._logger_connector.update_train_step_metrics()


def cluster_environment(trainer):
    """The trainer's cluster environment (``SLURMEnvironment`` under SLURM, with its ``auto_requeue``).

    Touches ``trainer._accelerator_connector.cluster_environment``: a parallel strategy exposes it as
    ``strategy.cluster_environment``, but a single-device strategy (one GPU under SLURM) holds none.
    """
    return trainer._accelerator_connector.cluster_environment


# ------------------------------------------------------------------------------------- checkpoints

def last_checkpoint_saved(callback) -> tuple[int | None, str]:
    """(global step, path) of the last checkpoint a ``ModelCheckpoint`` wrote in this process.

    Touches ``ModelCheckpoint._last_global_step_saved`` and ``._last_checkpoint_saved`` (no public
    counterpart: ``last_model_path`` is only kept with ``save_last``).
    """
    return callback._last_global_step_saved, callback._last_checkpoint_saved or ""


def mark_checkpoint_saved(callback, step: int) -> None:
    """Tell a ``ModelCheckpoint`` that step ``step`` is saved, so it does not save it again.

    Touches ``ModelCheckpoint._last_global_step_saved``, which its ``_should_skip_saving_checkpoint``
    compares with ``trainer.global_step`` before every scheduled save (batch end, epoch end, validation end).
    """
    callback._last_global_step_saved = step


# ------------------------------------------------------------------------------------- MLflow logger

def mlflow_tracking_uri(logger) -> str:
    """The store of Lightning's ``MLFlowLogger`` (``_tracking_uri``), without starting a run
    (``logger.experiment.tracking_uri`` would create one)."""
    return logger._tracking_uri


def mlflow_run_name(logger) -> str | None:
    """The run name the ``MLFlowLogger`` was given (``_run_name``; ``None``: none was set)."""
    return logger._run_name


def mlflow_run_started(logger) -> bool:
    """Whether the ``MLFlowLogger`` has created or attached its run in this process (``_initialized``);
    ``logger.run_id``/``logger.experiment`` would create one when it has not."""
    return bool(logger._initialized)


def attach_mlflow_run(logger, run_id: str) -> None:
    """Make a not-yet-started ``MLFlowLogger`` log into the existing run ``run_id``.

    Touches ``MLFlowLogger._run_id``: the constructor's ``run_id`` does the same, but LightningCLI
    has built the logger before the run directory's record names the run. Refused once the logger
    has started a run (it would keep logging into that one).
    """
    if mlflow_run_started(logger):
        raise RuntimeError("attach_mlflow_run: the MLflow logger has already started a run")
    logger._run_id = run_id


# ------------------------------------------------------------------------------------- strategies

def set_data_parallel_size(strategy, size: int) -> None:
    """Set a ``ModelParallelStrategy``'s data-parallel size before its ``setup_environment``.

    Touches ``ModelParallelStrategy._data_parallel_size``: the constructor takes a number or
    ``"auto"`` (= the number of nodes, tensor parallel within a node); pure FSDP2 wants every rank,
    ``num_nodes * num_processes``, known only once the trainer has set the devices.
    """
    strategy._data_parallel_size = size


def fsdp_lazy_init(module) -> None:
    """Run FSDP2's root lazy initialisation on a ``fully_shard``-ed root module now.

    Touches torch's ``FSDPModule._get_fsdp_state()._lazy_init()`` (torch >= 2.4): the root's lazy init
    (it claims the sharded layers as its children) normally runs in its first ``forward``;
    ``unshard()`` does not run it, and generation unshards the layers without a root forward.
    """
    module._get_fsdp_state()._lazy_init()

