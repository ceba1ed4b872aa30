"""The driver's prune decisions as a Ray Tune scheduler: pruning acts as early stopping across trials.

Tune asks its scheduler about each result before its searcher and callbacks, so this
is where a trial's epoch reaches the driver: `on_result(tune_trial_id, result)` takes
the epoch (its curve, its report to Optuna's pruner: `dlsearch.search.pruning`) and
answers whether the trial must stop now. Tune then stops it (STOP); the trial sees a
`SystemExit` out of its `report`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class DriverScheduler(FIFOScheduler):
    """Passes every result to `on_result`; STOP when it answers True."""

    def __init__(self, on_result: Callable[[str, Mapping[str, Any]], bool]):
        super().__init__()
        self._on_result = on_result

    def on_trial_result(self, tune_controller: object, trial: Any, result: dict) -> str:
        return TrialScheduler.STOP if self._on_result(trial.trial_id, result) else TrialScheduler.CONTINUE

    def __getstate__(self) -> dict:
        # Tune pickles its scheduler into its experiment state; the driver stays out of that copy.
        return {k: v for k, v in self.__dict__.items() if k != "_on_result"}
