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
  included), `seed` (this trial's), `data_seed`, `number`, `objective`, `params`.
- `report(epoch, metrics, checkpoint=None)`, once per epoch: epochs count from 1 and increase;
  `metrics` maps names to numbers, and should hold the objective's metric, which is what the
  pruner sees and what the trial's value is taken from (its best epoch, as for the built-in
  loop). `epoch_time_s` is added when missing. A non-finite objective fails the trial, like
  a diverged loss in the built-in loop. `checkpoint` is any object `torch.save` can write; it
  is copied when `report` is called, so live tensors (a `state_dict()`) are fine.
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
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dlsearch.config.trial_config import TrialConfig
from dlsearch.config.entrypoints import resolve
from dlsearch.trial.train import Report, TrialPruned, TrialResult

CUSTOM_KEY = "custom"  # marks a resume state written by this harness (the user's object is under it)
# Keys Ray Tune or dlsearch put into each result: a metric of that name would be overwritten.
RESERVED = frozenset({
    "epoch", "done", "training_iteration", "trial_id", "time_this_iter_s", "time_total_s", "timestamp",
    "date", "pid", "hostname", "node_ip", "config", "should_checkpoint", "checkpoint_dir_name",
    "time_since_restore", "iterations_since_restore", "experiment_tag", "node_id", "dlsearch_final",
    "dlsearch_metrics",
})
_NAME = re.compile(r"^[\w.\-/ ]+$")  # what MLflow accepts as a metric name (and no comma)


class TrialReporter:
    """What a custom trainable gets as `report`; see the module docstring for the contract."""

    def __init__(self, cfg: TrialConfig, report: Report | None, resume: Mapping[str, Any] | None = None,
                 on_artifact: Callable[[Path], None] | None = None):
        self._report = report
        self._metric = cfg.objective.metric
        self._maximize = cfg.objective.direction == "maximize"
        self._on_artifact = on_artifact
        self.state = _CustomState.restore(resume) if resume is not None else _CustomState()
        self.fail_reason: str | None = None
        self.pruned: TrialPruned | None = None
        self._last_epoch = 0  # this run's: a trial restarted without its checkpoint may begin again at 1
        self._clock = time.perf_counter()

    def __call__(self, epoch: int, metrics: Mapping[str, float], checkpoint: Any = None) -> None:
        if self.fail_reason is not None:
            raise TrialFailed(self.fail_reason)  # the trainable caught the first one and went on
        if self.pruned is not None:
            raise self.pruned
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= self._last_epoch:
            raise ValueError(f"report: epoch must be an integer greater than {self._last_epoch} (got {epoch!r})")
        row = _checked_metrics(metrics)
        now = time.perf_counter()
        row.setdefault("epoch_time_s", now - self._clock)
        self._clock, self._last_epoch = now, epoch
        value = row.get(self._metric)
        if value is not None and not math.isfinite(value):
            self.fail_reason = (f"{self._metric} became {value} at epoch {epoch}: "
                                "the trainable reported a non-finite objective")
            raise TrialFailed(self.fail_reason)
        self.state.record(epoch, row, value, self._maximize, checkpoint)
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
    if state.best_epoch is None:
        seen = sorted({k for row in state.history for k in row if k != "epoch"})
        return state.result("FAIL", f"the trainable never reported the objective {cfg.objective.metric!r}"
                                    f" (it reported: {', '.join(seen) or 'nothing'})", final)
    return state.result("COMPLETE", None, final)


# ---------------------------------------------------------------- helpers


@dataclass
class _CustomState:
    """What the harness knows of the trial: its curve, best epoch and the user's last checkpoint."""

    epoch: int = 0
    best_value: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    user_checkpoint: Any = None

    @classmethod
    def restore(cls, resume: Mapping[str, Any]) -> _CustomState:
        return cls(epoch=resume["epoch"], best_value=resume["best_value"], best_epoch=resume["best_epoch"],
                   best_metrics=dict(resume["best_metrics"]), history=list(resume["history"]),
                   user_checkpoint=resume[CUSTOM_KEY])

    def record(self, epoch: int, row: dict[str, float], value: float | None, maximize: bool, checkpoint: Any) -> None:
        self.epoch = epoch
        # A trial restarted without using its checkpoint reports its first epochs again: the new ones count.
        self.history = [r for r in self.history if r["epoch"] < epoch] + [{"epoch": epoch, **row}]
        if value is not None and (self.best_value is None or (value > self.best_value if maximize
                                                              else value < self.best_value)):
            self.best_value, self.best_epoch, self.best_metrics = value, epoch, dict(row)
        if checkpoint is not None:
            # A copy: live tensors (a state_dict) would otherwise change under it as training goes on.
            self.user_checkpoint = copy.deepcopy(checkpoint)

    def resume_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_value": self.best_value, "best_epoch": self.best_epoch,
                "best_metrics": self.best_metrics, "history": list(self.history), CUSTOM_KEY: self.user_checkpoint}

    def result(self, status: str, reason: str | None, final: dict[str, float] | None = None) -> TrialResult:
        final = dict(final or {})
        times = [row["epoch_time_s"] for row in self.history if "epoch_time_s" in row]
        return TrialResult(
            state=status,
            epochs_run=self.epoch,
            best_epoch=self.best_epoch,
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
        raise TypeError(f"report: metrics must be a mapping of names to numbers (got a {type(metrics).__name__})")
    row: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED:
            raise ValueError(f"report: metric name {name!r} is reserved or not a valid MLflow metric name")
        row[name] = _number(value, f"report: metric {name!r}")
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
