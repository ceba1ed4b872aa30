"""The one prune decision, for a single trial and for a population member alike.

Ray's `OptunaSearch` hard-codes Optuna's `NopPruner`; dlsearch asks Optuna's own
pruner instead, with the same verbs as an Optuna objective: `report(value, step)`,
then `should_prune()`. The driver calls this once per trial and epoch (it drops
epochs a restarted worker repeats), so Optuna sees each step once, in order.
"""

from __future__ import annotations

import math
from typing import Any

import optuna


def should_prune(trial: optuna.Trial, value: Any, epoch: int) -> bool:
    """Report the objective `value` at `epoch` to `trial` and ask its pruner whether to stop it now.

    A missing or non-finite value is not reported and never prunes: the trial's own loop
    fails it (a diverged loss) or it is not the objective's epoch.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    trial.report(float(value), step=epoch)
    return trial.should_prune()
