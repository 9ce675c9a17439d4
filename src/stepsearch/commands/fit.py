"""LightningCLI for ``fit``/``validate``/``test``/``predict``, with runs that survive (``stepsearch.records.runs``).

The module (``StepSearchPPO``) and the DataModule (``StepSearchDataModule``) signatures are the YAML
schema (``python -m stepsearch fit --print_config`` shows it). Defaults: MLflow logger at
``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``, no sanity validation (the module runs its own
step-0 validation), resolved config logged to MLflow. Every Lightning flag applies, e.g.
``--trainer.strategy ddp|deepspeed --trainer.devices 8 --trainer.num_nodes 2`` (FSDP is refused: see README).

Added flags: ``--seed S`` (every seed of the config, and ``{seed}`` in any path, become ``S``: one
flag gives a separate, complete run), ``--run_dir`` (default ``{default_root_dir}/{config}-{algorithm}-seed{S}``),
``--allow_config_change`` (resume although the config changed; recorded), ``--predictions_file``.
``fit --ckpt_path last`` resumes the run directory's highest checkpoint into the same MLflow run
(``auto``: the same if there is one, else a fresh start). Flags are never
abbreviated (``--trainer.max_step`` is an error, not ``max_steps``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from stepsearch import lightning_adapter
from stepsearch.errors import ConfigError, StepSearchError
from stepsearch.records.tracking import MLflowSaveConfigCallback
from stepsearch.commands.argument_errors import parse_lightning_arguments
from stepsearch.data.datamodule import StepSearchDataModule
from stepsearch.records import checkpoints, runs, session as opening
from stepsearch.records.runs import find_last_checkpoint, mlflow_run
from stepsearch.records.store import check_logger_stores, check_writable
from stepsearch.training.module import StepSearchPPO
from stepsearch.training.progress_bar import use_iteration_progress
from stepsearch.training.sharding import check_strategy_and_sizes
from stepsearch.records.mlflow_resume import attach_recorded_run

# Config keys that hold seeds: ``--seed S`` sets every one present (the world, the tiny model, the
# warm-start, the data order, rollout sampling, and Lightning's global seed).
SEED_KEYS = ("seed_everything", "model.seed", "data.seed", "data.world.seed", "model.bootstrap.tiny.seed",
             "model.bootstrap.warm_start.seed")
# Counts that must be at least the minimum (``None`` values are left alone); -1 is Lightning's "no
# limit" for ``max_steps``/``devices``, handled in :func:`check_counts`.
COUNT_MINIMUMS = {
    "trainer.max_steps": 1, "trainer.devices": 1, "trainer.num_nodes": 1, "trainer.accumulate_grad_batches": 1,
    "trainer.log_every_n_steps": 1, "trainer.val_check_interval": 1, "trainer.check_val_every_n_epoch": 1,
    "trainer.max_epochs": 1, "model.ppo.ppo_epochs": 1, "model.ppo.mini_batch_size": 1,
    "model.ppo.micro_batch_size": 1, "model.ppo.grpo_group_size": 1, "model.rollout.max_turns": 1,
    "model.log_samples_every_n_steps": 0, "model.num_logged_samples": 0, "data.batch_size": 1,
    "data.val_batch_size": 1, "data.max_train_examples": 1, "data.max_val_examples": 1,
    "data.max_test_examples": 1, "data.num_workers": 0,
}


class SaveConfigCallback(MLflowSaveConfigCallback):
    """On a resume, the config goes to ``config_resume{N}.yaml`` and params are not re-logged
    (MLflow refuses changed params; the first process logged them)."""

    resume_number: int = 0
    pending: str | None = None

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if not self.resume_number:
            return super().save_config(trainer, pl_module, stage)
        self.pending = self.parser.dump(self.config, skip_none=False)  # logged once the checkpoint has loaded

    def on_fit_start(self, trainer, pl_module) -> None:
        client, run_id = mlflow_run(trainer.logger)
        if client is not None and self.pending is not None:
            client.log_text(run_id, self.pending, f"config_resume{self.resume_number}.yaml")
        self.pending = None


class StepSearchCLI(LightningCLI):
    """LightningCLI with StepSearch defaults, run directories, resume and preemption."""

    def __init__(self, *args, session, **kwargs):
        self.session = session
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--seed", type=int | None, default=None,
                            help="one seed for the whole run: sets every seed of the config and fills {seed} in paths")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="the run's directory (run.json, checkpoints/); default "
                                 "{trainer.default_root_dir}/{config}-{algorithm}-seed{S}")
        parser.add_argument("--allow_config_change", type=bool, default=False,
                            help="resume although the config differs from the run's record (the change is recorded)")
        parser.add_argument("--predictions_file", type=str | None, default=None,
                            help="predict: the JSONL of per-question predictions (default "
                                 "{trainer.default_root_dir}/predictions.jsonl)")

    def parse_arguments(self, parser, args) -> None:
        """A parse error is one line with a "did you mean", not the usage (commands.argument_errors)."""
        parse_lightning_arguments(super().parse_arguments, parser, getattr(self, "_subcommand_parsers", {}).values(), args)

    def subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self.subcommand_config()
        seed = apply_seed(config)
        if config.get("seed") is not None:
            from lightning.pytorch import seed_everything

            seed_everything(seed, workers=True)
        check_counts(config, self.subcommand)

        check_logger_stores(config)
        self.session.seed = seed

    def before_fit(self) -> None:
        use_iteration_progress(self.trainer)  # "PPO iteration k/N" (plain lines in a log), not "Epoch 0/-2"
        self.session.prepare_fit(self)

    def after_fit(self) -> None:
        self.session.exit_code = self.session.finish(self.trainer)

    def before_predict(self) -> None:
        config = self.subcommand_config()
        path = config.get("predictions_file") or Path(config.get("trainer.default_root_dir") or ".") / "predictions.jsonl"

        check_writable(path, "--predictions_file", kind="file")  # before the model loads, not after
        self.trainer.callbacks.append(PredictionsWriter(Path(path)))


def apply_seed(config) -> int:
    """``--seed S``: set every seed key present to ``S``; fill ``{seed}`` in string values. Returns S
    (``seed_everything`` when ``--seed`` is not given, 0 when that is not an integer)."""
    seed = config.get("seed")
    if seed is not None:
        for key in SEED_KEYS:
            if key in config and (key == "seed_everything" or config[key] is not None):
                config[key] = seed
    else:
        seed = config.get("seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    for key, value in list(config.items()):
        if isinstance(value, str) and "{seed}" in value:
            config[key] = value.replace("{seed}", str(seed))
        elif isinstance(value, list) and any(isinstance(v, str) and "{seed}" in v for v in value):
            config[key] = [v.replace("{seed}", str(seed)) if isinstance(v, str) else v for v in value]
    return seed


def check_counts(config, subcommand: str | None) -> None:
    """One line for a zero or negative count (before Lightning or a dataclass sees it)."""
    for key, minimum in COUNT_MINIMUMS.items():
        value = config.get(key) if key in config else None
        if isinstance(value, str) and value.lstrip("-").isdigit():  # trainer.devices may come as text
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value >= minimum:
            continue
        if value == -1 and key in ("trainer.devices", "trainer.max_epochs"):
            continue  # Lightning's "all devices" / "no epoch limit"
        if key == "trainer.max_steps":
            if value == -1 and (subcommand != "fit" or (config.get("trainer.max_epochs") or 0) >= 1):
                continue  # bounded by max_epochs
            if value == -1:
                raise ConfigError("trainer.max_steps is not set: fit needs the PPO iterations to run "
                                  "(--trainer.max_steps N), or trainer.max_epochs")
            raise ConfigError(f"trainer.max_steps must be >= 1 for fit (got {value}): the PPO iterations to run; "
                              "0 would export the untrained policy as the trained one (`validate` evaluates it)")
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


class PredictionsWriter(Callback):
    """``predict`` writes its rows (``evaluation.prediction_rows``) to a JSONL file and says where
    (one file per rank under DDP: ``name.rank{R}.jsonl``)."""

    def __init__(self, path: Path):
        self.path, self.handle, self.rows = Path(path), None, 0

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self.path if trainer.world_size == 1 else self.path.with_suffix(f".rank{trainer.global_rank}.jsonl")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = path.open("w")
        except OSError as err:
            raise StepSearchError(f"--predictions_file {path}: cannot write ({err.strerror})") from None
        self.path = path

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import json

        for row in outputs or []:
            self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.rows += 1
        self.handle.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.handle.close()
        print(f"predictions: {self.rows} rows written to {self.path}", flush=True)


class RunSession:
    """What one ``fit`` process knows about its run: directory, resume, preemption, exit code."""

    def __init__(self):
        self.seed = 0
        self.run_dir: Path | None = None
        self.preemption = None
        self.exit_code = 0
        self.trainer = None
        self.lock = None  # records.lock.RunLock of the run directory (launch rank 0)

    def prepare_fit(self, cli: StepSearchCLI) -> None:
        self.trainer = cli.trainer
        prepare_fit(self, cli)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def finish(self, trainer) -> int:
        return self.preemption.after_fit(trainer) if self.preemption is not None else 0

    def interrupted_line(self) -> str | None:
        """The one line for Ctrl-C during ``fit`` (after marking the MLflow run KILLED), else ``None``."""
        if self.preemption is None or not self.preemption.interrupted or self.trainer is None:
            return None

        self.preemption.after_fit(self.trainer)  # marks the MLflow run KILLED
        _, run_id = mlflow_run(self.trainer.logger)
        last = find_last_checkpoint(self.run_dir) if self.run_dir else None
        return (f"interrupted (Ctrl-C) in PPO iteration {self.trainer.global_step}"
                + (f"; MLflow run {run_id} marked KILLED" if run_id else "")
                + (f"; resume from {last.name} with --ckpt_path last" if last else "; no checkpoint was written"))


def trainer_defaults() -> dict:
    return {
        "logger": {
            # the store: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db, resolved when the logger is made
            "class_path": "stepsearch.records.tracking.MLFlowLogger",
            "init_args": {"experiment_name": "stepsearch"},
        },
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }


def run_lightning(argv: list[str]) -> StepSearchCLI | None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference policy is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Ctrl-C is reported in one line of ours (below), not Lightning's "attempting graceful shutdown".
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "KeyboardInterrupt" not in record.getMessage())

    import signal

    session = RunSession()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGTERM", "SIGUSR1")}
    try:
        cli = StepSearchCLI(
            StepSearchPPO,
            StepSearchDataModule,
            args=None if argv == sys.argv[1:] else argv,
            save_config_callback=SaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=trainer_defaults(),
            seed_everything_default=0,
            parser_kwargs={"allow_abbrev": False},
            auto_configure_optimizers=False,  # the module builds its own two AdamWs: no --optimizer/--lr_scheduler
            session=session,
        )
    except SystemExit:
        line = session.interrupted_line()
        if line is None:
            raise
        raise StepSearchInterrupted(line) from None
    finally:  # the handlers fit installed go with it (matters when called in-process)
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
        session.close()
    if session.exit_code:
        raise SystemExit(session.exit_code)
    return cli


class StepSearchInterrupted(StepSearchError):
    """Ctrl-C during ``fit``: printed as one line, exit 130."""

    exit_code = 130


# ------------------------------------------------------------------------------------- fit preparation

def prepare_fit(session: RunSession, cli: StepSearchCLI) -> None:
    """Before ``trainer.fit``: the config checks that need the built objects (before the logger can
    create a run), the run directory, its lock and the resume (``stepsearch.records.session``),
    checkpoint names and retention, the MLflow run, the run record and the signal handlers."""
    config, init, trainer = cli.subcommand_config(), cli.config_init[cli.subcommand], cli.trainer
    cli.model.trainer = trainer  # public setter; fit sets the same trainer
    check_strategy_and_sizes(cli.model, "fit")  # a refused config leaves no MLflow run and no run directory
    flat = runs.flat_config(config)
    run_dir, resume, session.lock = opening.open_run(config, init, trainer, session.seed, flat)
    record = runs.read_record(run_dir)
    session.run_dir = run_dir
    checkpoint_dir = run_dir / runs.CHECKPOINT_DIR
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is None:
            callback.dirpath = str(checkpoint_dir.resolve())
        if callback.filename is None:  # the PPO iteration in the name, e.g. iter-000006.ckpt
            callback.filename, callback.auto_insert_metric_name = runs.CHECKPOINT_NAME, False
    checkpoints.configure_checkpointing(trainer, init.get("trainer.callbacks"))
    if resume is not None and record and (record.get("mlflow") or {}).get("run_id"):
        if attach_recorded_run(trainer, record["mlflow"]["run_id"]):
            for callback in trainer.callbacks:
                if isinstance(callback, SaveConfigCallback):
                    callback.resume_number = len(record.get("resumes", [])) + 1
    for logger in trainer.loggers:
        if not isinstance(logger.log_metrics, runs.LogOnce):
            logger.log_metrics = runs.LogOnce(logger)
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = lightning_adapter.cluster_environment(trainer)
    requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    session.preemption = runs.PreemptionCallback(checkpoint_dir, requeue=requeue)
    trainer.callbacks[:0] = [session.preemption, opening.RunRecorder(run_dir, flat, resume, session.preemption)]
    session.preemption.install()
