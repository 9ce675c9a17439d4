"""The ``fit`` progress display in PPO iterations: ``PPO iteration k/max_steps``, not ``Epoch 0/-2``.

Lightning's default bar counts batches of an epoch and titles it ``Epoch e/max_epochs-1``; a PPO run
is bounded by ``trainer.max_steps`` (``max_epochs`` is -1, hence ``Epoch 0/-2``), one PPO iteration
per optimizer step. On a terminal, :class:`IterationRichBar` is Lightning's rich bar counting PPO
iterations of ``max_steps`` (a resumed run starts at its iteration). When stdout is not a terminal
(a log file), :class:`IterationLines` prints one plain line per PPO iteration, ``PPO: 12/50
iterations (24%), 8.1 s/iteration, ETA 5m08s, train/reward 0.310`` (or one every
``$STEPSEARCH_PROGRESS_EVERY`` seconds when set), and lines for scheduled validations
(:mod:`stepsearch.progress`). :func:`use_iteration_progress` swaps either in for Lightning's default bar.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from stepsearch.progress import EVERY_ENV, Progress, default_every, is_terminal

TRAIN_LABEL = "PPO iteration"


def iteration_total(trainer) -> int | None:
    """The PPO iterations the run is bounded by (``max_steps``), ``None`` when it has no such bound."""
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


class IterationRichBar(RichProgressBar):
    """Lightning's rich bar whose training task counts PPO iterations of ``max_steps``."""

    @property
    def total_train_batches(self):
        return iteration_total(self.trainer) or super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.show_iterations(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.show_iterations(trainer)

    def show_iterations(self, trainer) -> None:
        """The training task as ``PPO iteration`` with the iterations done (public API: ``progress``,
        ``train_progress_bar_id``, ``theme``), over Lightning's ``Epoch e/…`` and batch count."""
        if self.progress is None or not self.is_enabled or self.train_progress_bar_id is None:
            return
        label = f"{TRAIN_LABEL:{max(len(TRAIN_LABEL), len(self.validation_description))}}"
        description = f"[{self.theme.description}]{label}" if self.theme.description else label
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)
        self.refresh()


class IterationLines(ProgressBar):
    """Plain progress lines for a log file: one per PPO iteration (done/total, rate, ETA, the
    progress-bar metrics), and a start and end line per scheduled validation."""

    def __init__(self, every: float | None = None, stream=None):
        super().__init__()
        # A PPO iteration takes seconds to minutes: one line each unless the environment asks otherwise.
        self.every = every if every is not None else (default_every() if os.environ.get(EVERY_ENV) else 0.0)
        self.stream = stream
        self._enabled = True
        self.iterations: Progress | None = None
        self.validation: Progress | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Started at the first iteration, not at on_train_start: the step-0 validation is not an iteration.
        if self.is_enabled and self.iterations is None:
            self.iterations = Progress("PPO", iteration_total(trainer), unit="iteration", every=self.every,
                                       terminal=False, start=trainer.global_step, stream=self.stream)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.iterations is not None:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            self.iterations.update(done=trainer.global_step, **{k: _number(v) for k, v in metrics.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        if self.iterations is not None:
            self.iterations.close()
            self.iterations = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.is_enabled and not trainer.sanity_checking:
            total = self.total_val_batches
            self.validation = Progress(f"validation at PPO iteration {trainer.global_step}",
                                       int(total) if total not in (None, float("inf")) else None, unit="batch",
                                       every=default_every(), terminal=False, stream=self.stream)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.validation is not None:
            self.validation.advance(1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.validation is not None:
            self.validation.close()
            self.validation = None


def _number(value):
    return float(value.item()) if hasattr(value, "item") else value


def use_iteration_progress(trainer) -> None:
    """Replace Lightning's default progress bar (if the trainer has one) by the PPO-iteration display:
    the rich bar on a terminal, plain lines otherwise. A progress bar the user configured is kept."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (RichProgressBar, TQDMProgressBar):
            trainer.callbacks[i] = IterationRichBar() if is_terminal() else IterationLines()
            return
