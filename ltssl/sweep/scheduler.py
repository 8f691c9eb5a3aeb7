"""Early stopping within comparable trials only: one ASHA state per group.

Accuracy at imbalance ratio 100 is lower than at ratio 1 whatever the hyperparameters, so one
ASHA over the whole sweep would stop every r = 100 trial. :class:`GroupedASHA` keeps one
:class:`~ray.tune.schedulers.AsyncHyperBandScheduler` per group (by default dataset, imbalance
ratio, balanced or LT, and method; the label is the trial config's ``group``) and sends each
trial's results only to its group's scheduler.

Time is the trial's ``epoch`` (from its metrics lines); the metric is read from evaluation lines
(``knn_acc`` every ``train.eval_every`` epochs). A trial that has trained all its epochs is never
stopped: it only has its final evaluation left, and stopping it would waste the training.
"""

from __future__ import annotations

from typing import Iterable

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler


class _LedgerTrial:
    """Stands for a finished trial of an earlier driver run when its history seeds a bracket."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class GroupedASHA(FIFOScheduler):
    """ASHA with one bracket state per ``trial.config["group"]``; records which trials it stopped."""

    # Each result must reach the scheduler before the next line: no buffered results.
    _supports_buffered_results = False

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int = 1,
                 reduction_factor: float = 2.0, time_attr: str = "epoch"):
        super().__init__()
        self._metric = metric
        self._mode = mode
        self.max_t = max_t
        self.grace_period = grace_period
        self.reduction_factor = reduction_factor
        self.time_attr = time_attr
        self.groups: dict[str, AsyncHyperBandScheduler] = {}
        self.stopped: set[str] = set()   # trial keys (trial.config["trial_key"]) stopped early

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are ours; Tune's TuneConfig values are the same

    def _new(self) -> AsyncHyperBandScheduler:
        return AsyncHyperBandScheduler(
            time_attr=self.time_attr,
            metric=self._metric,
            mode=self._mode,
            max_t=self.max_t,
            grace_period=self.grace_period,
            reduction_factor=self.reduction_factor,
            stop_last_trials=False,
        )

    def group(self, name: str) -> AsyncHyperBandScheduler:
        if name not in self.groups:
            self.groups[name] = self._new()
        return self.groups[name]

    def _of(self, trial) -> AsyncHyperBandScheduler:
        return self.group(str(trial.config.get("group", "")))

    def seed_history(self, group: str, trial_key: str, history: Iterable[tuple[int, float]]) -> None:
        """Record a finished trial's (epoch, metric) pairs, so new trials are ranked against it."""
        sched = self.group(group)
        bracket = sched._brackets[0]
        op = 1.0 if self._mode == "max" else -1.0
        fake = _LedgerTrial(f"ledger:{trial_key}")
        for epoch, value in sorted(history):
            bracket.on_result(fake, epoch, op * value)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        sched = self._of(trial)
        if result.get("final") or (result.get(self.time_attr) or 0) >= self.max_t:
            # All epochs trained: let the final evaluation finish (and feed the rung for others).
            sched.on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE
        action = sched.on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self.stopped.add(str(trial.config.get("trial_key")))
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        sched = self._of(trial)
        if trial.trial_id in sched._trial_info:
            sched.on_trial_complete(tune_controller, trial, result or {})
            sched._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial)._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial)._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        return f"GroupedASHA: {len(self.groups)} groups, {len(self.stopped)} trials stopped"
