"""Validation, test and predict hooks of :class:`stepsearch.training.module.StepSearchPPO` (a mixin).

Greedy rollouts through the one evaluation path (:func:`stepsearch.evaluation.loop.rollout_and_score`),
EM/F1 (SQuAD normalisation) overall, per dataset and per hop count; a validation pass at step 0
(after any warm-start, before the first update) and at the last iteration, outside Lightning's
schedule, logged at the PPO iteration; sample trajectories to MLflow. Expects ``val_metrics``,
``history``, ``last_val_step``, ``reward_config``, ``actor_critic``, ``num_logged_samples`` and
``ppo_iterations`` (the PPO iterations done, the module's own checkpointed counter) on the module.
"""

from __future__ import annotations

from stepsearch.records.runs import stop_signal
from stepsearch.evaluation.loop import prediction_rows, rollout_and_score
from stepsearch.records.tracking import log_trajectory_samples


class EvaluationHooks:
    def on_train_start(self) -> None:
        """Validation at step 0: after any warm-start, before the first PPO update."""
        if self.ppo_iterations == 0:
            self.validation_pass("step0")

    def on_train_end(self) -> None:
        self.final_validation()

    def final_validation(self) -> None:
        """A last validation at the final iteration, unless the schedule just ran one there (or a
        signal stopped the run: the resumed run validates at its end). Also called by the run's
        checkpoint callback before it saves the final checkpoint (``stepsearch.records.runs``)."""
        if self.last_val_step != self.ppo_iterations and not stop_signal(self.trainer):
            self.validation_pass("last")

    def validation_pass(self, key: str) -> None:
        """Validate outside Lightning's schedule; log at the current PPO iteration as ``history[key]``."""
        if self.trainer.datamodule is None or self.trainer.limit_val_batches == 0:
            return
        loader = self.trainer.datamodule.val_dataloader()
        metrics = self.evaluate_loader(loader, prefix="val")
        if not metrics:  # no validation data configured
            return
        self.history[key] = metrics
        self.last_val_step = self.ppo_iterations
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.ppo_iterations)

    def evaluate_loader(self, loader, prefix: str) -> dict[str, float]:
        self.val_metrics.to(self.device).reset()
        for batch in loader:
            self._eval_batch(batch)
        return self.val_metrics.compute(prefix)

    def _eval_batch(self, batch) -> None:
        examples = list(batch)
        trajectory, scores = rollout_and_score(self.trainer.datamodule.rollouts, examples, self.reward_config)
        self.val_metrics.update(examples, trajectory, scores)
        if self.val_metrics.samples is None:
            self.val_metrics.samples = (trajectory, scores, examples)

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.to(self.device).reset()

    def validation_step(self, batch, batch_idx):
        self._eval_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self.val_metrics.to(self.device).reset()

    def test_step(self, batch, batch_idx):
        self._eval_batch(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.val_metrics.compute(prefix)
        # Logged at step = PPO updates applied so far (as the step-0 pass); Lightning's default here is
        # one less, because validation runs before its batch counter moves on.
        step = self.logged_step()
        self.log_dict({**metrics, "step": float(step)}, sync_dist=False)
        self.history["last" if prefix == "val" else prefix] = metrics
        if prefix == "val":
            self.last_val_step = step
        if self.val_metrics.samples is not None:
            trajectory, scores, examples = self.val_metrics.samples
            log_trajectory_samples(self.logger, self.actor_critic.tokenizer, trajectory, scores, examples,
                                   f"samples/{prefix}_step{step:05d}", self.num_logged_samples)

    def logged_step(self) -> int:
        """The step of evaluation metrics: the PPO iterations done while fitting; outside ``fit``
        (``validate``/``test``) Lightning's ``global_step``, which does not restore the loops."""
        return self.ppo_iterations if self.trainer.state.fn == "fit" else self.trainer.global_step

    def predict_step(self, batch, batch_idx):
        examples = list(batch)
        return prediction_rows(examples, *rollout_and_score(self.trainer.datamodule.rollouts, examples, self.reward_config))
