"""LightningCLI for ``fit``/``validate``/``test``/``predict``.

The module (``StepSearchPPO``) and the DataModule (``StepSearchDataModule``) signatures are the YAML
schema (``python -m stepsearch fit --print_config`` shows it). Defaults: MLflow logger at
``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``, no sanity validation (the module runs its own
step-0 validation), resolved config logged to MLflow. Every Lightning flag applies, e.g.
``--trainer.strategy ddp|deepspeed --trainer.devices 8 --trainer.num_nodes 2`` (FSDP is refused: see README).
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from stepsearch.tracking import MLflowSaveConfigCallback, default_tracking_uri


class StepSearchCLI(LightningCLI):
    """LightningCLI with StepSearch defaults."""


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"experiment_name": "stepsearch", "tracking_uri": default_tracking_uri()},
        },
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }


def run_lightning(argv: list[str]) -> StepSearchCLI:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference policy is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    from stepsearch.data.datamodule import StepSearchDataModule
    from stepsearch.module import StepSearchPPO

    return StepSearchCLI(
        StepSearchPPO,
        StepSearchDataModule,
        args=None if argv == sys.argv[1:] else argv,
        save_config_callback=MLflowSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
    )
