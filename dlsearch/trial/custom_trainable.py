"""The user's own training function in place of the built-in loop: the study's `trainable`.

Contract (README, "Bring your own code")::

    def fit(config: dict, report) -> dict | None:
        state = report.last_checkpoint()             # None, or the last checkpoint of this trial
        start = state["epoch"] + 1 if state else 1   # after a worker crash, Ray restarts the trial
        for epoch in range(start, config["train"]["epochs"] + 1):
            ...
            report(epoch, {"val_loss": val_loss, "val_accuracy": acc}, checkpoint={"epoch": epoch, ...})
        report.log_artifact("confusion.png")
        return {"test_accuracy": test_acc}           # optional final metrics

- `config` is the trial's resolved configuration as a plain dict (`TrialConfig.to_dict()`):
  the `data`, `model` and `train` sections with the sampled values merged in (custom keys
  included), `seed` (this trial's), `data_seed`, `number`, `objective`, `params`, and each
  search key that is a plain name (`search: {x: ...}` arrives as `config["x"]`).
- `report(epoch, metrics, checkpoint=None)`, once per epoch: the first epoch may be 0 or 1 (as
  `range` gives it), then each is greater than the last; Optuna's step, MLflow's step and the
  pruner's `n_warmup_steps` all count the epochs as reported. A broken contract (an epoch out
  of order, a metric that is no number) is a `ReportError`: one line;
  `metrics` maps names to numbers, and should hold the objective's metric, which is what the
  pruner sees and what the trial's value is taken from (its best epoch, as for the built-in
  loop: one that beats the best so far by more than `train.early_stopping.min_delta`; see
  `dlsearch.trial.bookkeeping`). `epoch_time_s` is added when missing. A non-finite objective
  fails the trial, like a diverged loss in the built-in loop. `checkpoint` is any object
  `torch.save` can write; it is copied when `report` is called, so live tensors (a
  `state_dict()`) are fine.
- Pruning: when the pruner stops the trial, `report` does not return: it raises (inside Ray
  Tune, Tune's `SystemExit`; in-process, `TrialPruned` from the caller's report). Let it
  through; code in `finally` blocks runs. An exception of the trainable fails the trial with
  its message.
- `report.last_checkpoint()`: the last checkpoint this trial reported (also one restored after
  its worker died and Ray restarted it), or None.
- `report.log_artifact(path)`: a file or folder, copied at once, that lands in the trial's
  MLflow run whatever its end (complete, pruned, failed); a later one of the same name wins.
- The return value: None, or a mapping of final metric names to numbers, logged at the last
  epoch's step; `test_loss` and `test_accuracy` also go to the leaderboard.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dlsearch.config.entrypoints import resolve
from dlsearch.config.trial_config import TrialConfig
from dlsearch.errors import InputError
from dlsearch.trial.bookkeeping import BookRules, EpochBook, Verdict
from dlsearch.trial.train import Report, TrialPruned, TrialResult

CUSTOM_KEY = "custom"  # marks a resume state written by this harness (the user's object is under it)
# A metric may not be named like the step it is reported at (every other name is the trainable's own:
# the report carries them apart from Ray Tune's keys, see `dlsearch.protocol.EpochReport`).
RESERVED = frozenset({"epoch"})
_NAME = re.compile(r"^[\w.\-/ ]+$")  # what MLflow accepts as a metric name (and no comma)


class TrialReporter:
    """What a custom trainable gets as `report`; see the module docstring for the contract."""

    def __init__(self, cfg: TrialConfig, report: Report | None, resume: Mapping[str, Any] | None = None,
                 on_artifact: Callable[[Path], None] | None = None):
        self._report = report
        self._on_artifact = on_artifact
        # No patience: the trainable's own loop decides when to stop.
        rules = BookRules.for_trial(cfg, stop_early=False)
        self.state = _CustomState.restore(resume, rules) if resume is not None else _CustomState(EpochBook(rules))
        self.fail_reason: str | None = None
        self.pruned: TrialPruned | None = None
        # This run's last epoch (None: none yet). The first may be 0 or 1, as a loop over range() gives,
        # or where a restarted trial goes on; then each is greater than the last.
        self._last_epoch: int | None = None
        self._clock = time.perf_counter()

    def __call__(self, epoch: int, metrics: Mapping[str, float], checkpoint: Any = None) -> None:
        if self.fail_reason is not None:
            raise TrialFailed(self.fail_reason)  # the trainable caught the first one and went on
        if self.pruned is not None:
            raise self.pruned
        floor = -1 if self._last_epoch is None else self._last_epoch
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= floor:
            least = "0 or more" if self._last_epoch is None else f"greater than the last one ({self._last_epoch})"
            raise ReportError(f"report: epoch must be an integer, {least} (got {epoch!r})")
        row = _checked_metrics(metrics)
        now = time.perf_counter()
        row.setdefault("epoch_time_s", now - self._clock)
        self._clock, self._last_epoch = now, epoch
        verdict = self.state.record(epoch, row, checkpoint)
        if verdict.diverged:
            bad = verdict.diverged
            self.fail_reason = (f"{bad} became {row[bad]} at epoch {epoch}: "
                                "the trainable reported a non-finite objective")
            raise TrialFailed(self.fail_reason)
        if self._report is None:
            return
        try:
            if checkpoint is None:
                self._report(epoch, row)
            else:
                self._report(epoch, row, checkpoint=self.state.resume_state())
        except TrialPruned as pruned:
            self.pruned = pruned
            raise

    def last_checkpoint(self) -> Any:
        """The last checkpoint this trial reported (before a restart too), or None."""
        return self.state.user_checkpoint

    def log_artifact(self, path: str | Path) -> None:
        """Send a file or folder to the trial's MLflow run (copied now)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"report.log_artifact: no such file or folder: {path}")
        if self._on_artifact is not None:
            self._on_artifact(path.resolve())


class TrialFailed(Exception):
    """Raised by `report` when the trial has failed (a non-finite objective)."""


class ReportError(InputError, ValueError):
    """The trainable broke `report`'s contract (an epoch out of order, a metric that is no number):
    one line naming what was wrong, in `dlsearch train` (exit 2) and as the trial's fail reason."""


def run_custom_trainable(
    cfg: TrialConfig,
    report: Report | None = None,
    *,
    resume: Mapping[str, Any] | None = None,
    on_artifact: Callable[[Path], None] | None = None,
) -> TrialResult:
    """Run the study's `trainable` for one trial, reporting through `report` like `train_trial`.

    `resume` is a checkpoint this function gave `report` earlier; `on_artifact(path)` receives
    each path the trainable logs. `TrialPruned` raised by `report` propagates (also when the
    trainable swallowed it); other exceptions of the trainable propagate too.
    """
    fn = resolve(cfg.trainable or "", "trainable", cfg.base_dir)
    reporter = TrialReporter(cfg, report, resume, on_artifact)
    try:
        returned = fn(cfg.to_dict(), reporter)
    except TrialFailed:
        returned = None
    except Exception:
        if reporter.fail_reason is None:
            raise
        returned = None  # the trainable failed on its way out after the objective went bad
    if reporter.pruned is not None:
        raise reporter.pruned
    state = reporter.state
    if reporter.fail_reason is not None:
        return state.result("FAIL", reporter.fail_reason)
    final = _final_metrics(returned)
    if state.book.best_epoch is None:
        seen = sorted({k for row in state.history for k in row if k != "epoch"})
        return state.result("FAIL", f"the trainable never reported the objective {cfg.objective.metric!r}"
                                    f" (it reported: {', '.join(seen) or 'nothing'})", final)
    return state.result("COMPLETE", None, final)


# ---------------------------------------------------------------- helpers


@dataclass
class _CustomState:
    """What the harness knows of the trial: its curve, best epoch and the user's last checkpoint."""

    book: EpochBook
    epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    user_checkpoint: Any = None

    @classmethod
    def restore(cls, resume: Mapping[str, Any], rules: BookRules) -> _CustomState:
        history, best_epoch = list(resume["history"]), resume["best_epoch"]
        # The resume state keeps no count of epochs without improvement: it is the number of
        # objective values reported after the best epoch.
        since = sum(1 for r in history if r["epoch"] > (best_epoch or 0) and rules.metric in r)
        book = EpochBook(rules, best_epoch=best_epoch, best_value=resume["best_value"],
                         epochs_without_improvement=since)
        return cls(book=book, epoch=resume["epoch"], best_metrics=dict(resume["best_metrics"]), history=history,
                   user_checkpoint=resume[CUSTOM_KEY])

    def record(self, epoch: int, row: dict[str, float], checkpoint: Any) -> Verdict:
        """Add epoch `epoch`'s metrics; a non-finite objective (`Verdict.diverged`) adds nothing."""
        value = row.get(self.book.rules.metric)
        # An epoch without the objective leaves the book as it was.
        verdict = self.book.update(epoch, value) if value is not None else Verdict()
        if verdict.diverged:
            return verdict
        self.epoch = epoch
        # A trial restarted without using its checkpoint reports its first epochs again: the new ones count.
        self.history = [r for r in self.history if r["epoch"] < epoch] + [{"epoch": epoch, **row}]
        if verdict.improved:
            self.best_metrics = dict(row)
        if checkpoint is not None:
            # A copy: live tensors (a state_dict) would otherwise change under it as training goes on.
            self.user_checkpoint = copy.deepcopy(checkpoint)
        return verdict

    def resume_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_value": self.book.best_value, "best_epoch": self.book.best_epoch,
                "best_metrics": self.best_metrics, "history": list(self.history), CUSTOM_KEY: self.user_checkpoint}

    def result(self, status: str, reason: str | None, final: dict[str, float] | None = None) -> TrialResult:
        final = dict(final or {})
        times = [row["epoch_time_s"] for row in self.history if "epoch_time_s" in row]
        return TrialResult(
            state=status,
            epochs_run=len(self.history),
            best_epoch=self.book.best_epoch,
            best_metrics=dict(self.best_metrics),
            test_loss=final.pop("test_loss", None),
            test_accuracy=final.pop("test_accuracy", None),
            epoch_time_s=statistics.median(times) if times else None,
            fail_reason=reason,
            history=[{k: v for k, v in row.items() if k != "epoch"} for row in self.history],
            final_metrics=final,
            final_checkpoint=self.user_checkpoint,
        )


def _checked_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise ReportError(f"report: metrics must be a mapping of names to numbers (got a {type(metrics).__name__})")
    row: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
            raise ReportError(f"report: metric name {name!r} is reserved or not a valid MLflow metric name")
        try:
            row[name] = _number(value, f"report: metric {name!r}")
        except TypeError as err:
            raise ReportError(str(err)) from None
    return row


def _final_metrics(returned: Any) -> dict[str, float]:
    if returned is None:
        return {}
    if not isinstance(returned, Mapping):
        raise TypeError(f"trainable: must return None or a mapping of final metrics (got a {type(returned).__name__})")
    return {str(k): _number(v, f"trainable: final metric {k!r}") for k, v in returned.items()}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise TypeError(f"{what} must be a number (got {value!r})")
    try:
        return float(value)  # Python and numpy numbers, 0-d tensors
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be a number (got {value!r})") from None
