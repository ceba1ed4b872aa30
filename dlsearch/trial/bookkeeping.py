"""Epoch bookkeeping: a trial's best epoch, its patience and its divergence, in one place.

Every loop that trains a trial keeps one `EpochBook`: the built-in loop
(`dlsearch.trial.train.train_trial`), each member of a population
(`dlsearch.trial.population.train_population`) and the harness around a custom trainable
(`dlsearch.trial.custom_trainable.run_custom_trainable`). So a trial's value, its best epoch's
objective, means the same whichever of them ran it.

Once per epoch the loop hands the book the objective's value; `update(epoch, value)` answers
with a `Verdict`:

- `improved`: the first value, or one that beats the best so far by MORE than `min_delta`
  (maximize: `value > best + min_delta`; minimize: `value < best - min_delta`). A tie is no
  improvement, so the earliest of equal epochs stays the best. The loop keeps this epoch's
  weights (and metrics) as the best.
- `should_stop`: `patience` updates in a row brought no improvement. The loops stop BEFORE
  their next epoch, not at once: the epoch that used up the patience is still reported (the
  pruner may still prune it), and a trial resumed from that epoch's checkpoint stops there too.
- `diverged`: the name of the first non-finite value (NaN or +-inf) among the `losses` passed
  along and then the objective; the trial fails. The book is left as it was.

Custom trainables honour `train.early_stopping.min_delta` like the other loops (before this
module their harness took any strict gain as the new best). They have no patience
(`BookRules.patience` is None): the trainable's own loop decides when to stop.

Pure Python: no torch, so it is cheap to import and to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from dlsearch.config.trial_config import TrialConfig

# The losses whose divergence fails a trial of the built-in loop or a population member, named
# in this order in the reason: a NaN training loss makes the validation loss NaN too.
LOSSES = ("train_loss", "val_loss")


@dataclass(frozen=True)
class BookRules:
    """What an `EpochBook` watches: the objective's metric and direction, and early stopping's knobs.

    `min_delta` is in the metric's own units; `patience` counts epochs (None: never stop early).
    """

    metric: str
    maximize: bool
    min_delta: float = 0.0
    patience: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (self.min_delta >= 0):  # also refuses NaN
            problems.append(f"`min_delta >= 0` must hold, but got (min_delta={self.min_delta})")
        if self.patience is not None and self.patience < 1:
            problems.append(f"`patience >= 1` must hold, but got (patience={self.patience})")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def for_trial(cls, cfg: TrialConfig, *, stop_early: bool = True) -> BookRules:
        """The rules of `cfg`: its (first) objective and `train.early_stopping`; no patience unless `stop_early`."""
        stopping = cfg.train.early_stopping
        return cls(
            metric=cfg.objective.metric,
            maximize=cfg.objective.direction == "maximize",
            min_delta=stopping.min_delta,
            patience=stopping.patience if stop_early else None,
        )


@dataclass(frozen=True)
class Verdict:
    """What one epoch's value means; see the module docstring."""

    improved: bool = False
    should_stop: bool = False
    diverged: str | None = None  # the name of the first non-finite value


@dataclass
class EpochBook:
    """The best epoch so far, its value, and how many updates since brought no improvement.

    A loop resumed from a checkpoint rebuilds its book from these three fields.
    """

    rules: BookRules
    best_epoch: int | None = None
    best_value: float | None = None
    epochs_without_improvement: int = 0

    @property
    def should_stop(self) -> bool:
        """Whether the patience is used up: the loop trains no further epoch."""
        patience = self.rules.patience
        return patience is not None and self.epochs_without_improvement >= patience

    def update(self, epoch: int, value: float, *, losses: Mapping[str, float] | None = None) -> Verdict:
        """Record epoch `epoch`'s objective `value`; `losses` are this epoch's values that must stay finite too."""
        for name, loss in (losses or {}).items():
            if not math.isfinite(loss):
                return Verdict(diverged=name)
        if not math.isfinite(value):
            return Verdict(diverged=self.rules.metric)
        improved = self.best_value is None or self._beats_best(value)
        if improved:
            self.best_epoch, self.best_value, self.epochs_without_improvement = epoch, value, 0
        else:
            self.epochs_without_improvement += 1
        return Verdict(improved=improved, should_stop=self.should_stop)

    def _beats_best(self, value: float) -> bool:
        assert self.best_value is not None
        r = self.rules
        return value > self.best_value + r.min_delta if r.maximize else value < self.best_value - r.min_delta
