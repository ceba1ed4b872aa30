"""Optuna's pruners as a Ray Tune scheduler: pruning acts as early stopping across trials.

Ray's `OptunaSearch` hard-codes Optuna's `NopPruner`, and Tune asks the
scheduler about each result before the searcher, so pruning has to live here:
each epoch's objective value goes to the Optuna trial (`report(value,
step=epoch)`), and `should_prune()` decides whether the Tune trial stops.
"""

from __future__ import annotations

from typing import Callable

import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class OptunaPruningScheduler(FIFOScheduler):
    """Forwards each epoch's `metric` to the trial's Optuna trial; STOP when Optuna prunes it.

    `optuna_trial_for(tune_trial_id)` gives the Optuna trial the driver asked for
    that Tune trial (or None for a trial it does not know). Results without an
    `epoch`, or marked `final_key`, are not epochs and are never pruned on.
    """

    def __init__(
        self, metric: str, optuna_trial_for: Callable[[str], optuna.Trial | None], final_key: str = "final"
    ):
        super().__init__()
        self._objective = metric
        self._optuna_trial_for = optuna_trial_for
        self._final_key = final_key
        self.pruned: dict[str, int] = {}  # Tune trial id -> the epoch it was pruned at
        self._last_epoch: dict[str, int] = {}

    def on_trial_result(self, tune_controller: object, trial: object, result: dict) -> str:
        if result.get(self._final_key) or "epoch" not in result or self._objective not in result:
            return TrialScheduler.CONTINUE
        optuna_trial = self._optuna_trial_for(trial.trial_id)
        if optuna_trial is None:
            return TrialScheduler.CONTINUE
        epoch = int(result["epoch"])
        if epoch <= self._last_epoch.get(trial.trial_id, 0):
            return TrialScheduler.CONTINUE  # re-run after a worker restart from an older checkpoint
        self._last_epoch[trial.trial_id] = epoch
        optuna_trial.report(float(result[self._objective]), step=epoch)
        if optuna_trial.should_prune():
            self.pruned[trial.trial_id] = epoch
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def __getstate__(self) -> dict:
        # Tune pickles its scheduler into its experiment state; the Optuna trials stay with the driver.
        return {k: v for k, v in self.__dict__.items() if k != "_optuna_trial_for"}

    def debug_string(self) -> str:
        return f"OptunaPruningScheduler: {len(self.pruned)} pruned"
