"""A simulated backend: the driver's own asks, prunes and tells, with trials that replay recorded
learning curves on a simulated clock.

`simulate_study(spec, curve_of, n_workers)` runs a study as `run_study` does, with the same
`_Driver` (its asks, its prune decisions through the study's Optuna pruner, its tells), but
instead of Ray it keeps `n_workers` simulated workers busy: each trial's epoch takes the time
its curve says, so trials finish out of order as they would on `n_workers` GPUs, and a study of
a thousand epochs runs in seconds. Use it to try a sampler or pruner on recorded curves (a
benchmark's surrogate, or the curves of your own past runs) before spending GPUs on it. Syne
Tune's simulator backend is the anchor: the same scheduler code, a simulated time.

What a trial does here mirrors the harness around a custom trainable: it reports each epoch's
metrics (with `epoch_time_s`, the simulated duration) until the driver prunes it or its curve
ends (at most `train.epochs`), then its last report (`TrialEnd`, its best epoch as
`dlsearch.trial.bookkeeping` picks it); a non-finite objective fails it. Nothing is written to
MLflow unless a tracker is given, and the Optuna study lives in memory unless one is given.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import optuna

from dlsearch.config.spec import StudySpec
from dlsearch.protocol import Assignment, EpochReport, TrialEnd, to_result
from dlsearch.search.space import directions, make_pruner, make_sampler
from dlsearch.tracking.null import NullTracker
from dlsearch.trial.bookkeeping import BookRules, EpochBook
from dlsearch.tuner.runner import _Driver, _quiet_libraries


class Curve(Protocol):
    """One trial's recorded learning curve: `n_epochs` epochs, each with its metrics and duration."""

    n_epochs: int

    def at(self, epoch: int) -> tuple[Mapping[str, float], float]:
        """Epoch `epoch`'s metrics (name -> number, the objective's among them) and its duration in seconds."""
        ...


@dataclass(frozen=True)
class RecordedCurve:
    """A curve held in memory: `metrics[i]` and `epoch_time_s[i]` are epoch i + 1's."""

    metrics: Sequence[Mapping[str, float]]
    epoch_time_s: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.metrics) != len(self.epoch_time_s):
            raise ValueError(f"`len(metrics) == len(epoch_time_s)` must hold, but got "
                             f"({len(self.metrics)}, {len(self.epoch_time_s)})")
        bad = [t for t in self.epoch_time_s if not (t >= 0 and math.isfinite(t))]
        if bad:
            raise ValueError(f"every epoch_time_s must be finite and >= 0, but got {bad[0]!r}")

    @property
    def n_epochs(self) -> int:
        return len(self.metrics)

    def at(self, epoch: int) -> tuple[Mapping[str, float], float]:
        return self.metrics[epoch - 1], float(self.epoch_time_s[epoch - 1])


@dataclass(frozen=True)
class EpochEvent:
    """One epoch a trial reported, in the order of the simulated clock."""

    time_s: float  # simulated seconds from the study's start to the end of this epoch
    epochs_run: int  # epochs the study had run, this one included
    number: int  # the Optuna trial number
    epoch: int
    value: float | None  # the objective's value (None when the curve lacks it)


@dataclass(frozen=True)
class TrialEvent:
    """A trial the driver closed: COMPLETE (with its value), PRUNED or FAIL."""

    time_s: float
    epochs_run: int
    number: int
    state: str
    value: float | None


@dataclass
class SimulatedStudy:
    """What `simulate_study` ends with: the Optuna study and what happened when."""

    study: optuna.Study
    n_workers: int
    epochs: list[EpochEvent] = field(default_factory=list)
    ends: list[TrialEvent] = field(default_factory=list)
    time_s: float = 0.0  # the simulated clock at the end
    n_interrupted: int = 0  # trials still running when a budget ran out (FAIL `interrupted`, as on Ray)

    @property
    def epochs_run(self) -> int:
        return len(self.epochs)


def simulate_study(
    spec: StudySpec,
    curve_of: Callable[[dict[str, Any]], Curve],
    n_workers: int,
    *,
    trials: int | None = None,
    max_epochs: int | None = None,
    max_time_s: float | None = None,
    study: optuna.Study | None = None,
    tracker: Any = None,
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> SimulatedStudy:
    """Run `spec` with `n_workers` simulated workers, each trial replaying `curve_of(params)`.

    `curve_of` gets a trial's sampled values ({search key: value}) and returns its `Curve`.
    The study stops at the first budget reached: `trials` asked (default `budget.trials`, none
    when `max_epochs` is given), `max_epochs` epochs run, or `max_time_s` simulated seconds
    (default `budget.timeout_s`); trials still running then are closed as a stopped run closes
    them (FAIL `interrupted`). `study` replaces the in-memory study built from the spec's sampler
    and pruner (say, to try a sampler dlsearch has no name for); `tracker` (default: none) gets
    the driver's MLflow writes; `on_event` the driver's progress events.
    """
    problems = []
    if n_workers < 1:
        problems.append(f"n_workers: must be >= 1 (got {n_workers})")
    if spec.resources.population > 1:
        problems.append(f"resources.population: a simulated worker runs one trial; must be 1 "
                        f"(got {spec.resources.population})")
    if max_epochs is not None and max_epochs < 1:
        problems.append(f"max_epochs: must be >= 1 (got {max_epochs})")
    if problems:
        raise ValueError("; ".join(problems))
    _quiet_libraries()
    if study is None:
        study = optuna.create_study(sampler=make_sampler(spec, n_workers), pruner=make_pruner(spec),
                                    directions=directions(spec), study_name=spec.name)
    out = SimulatedStudy(study, n_workers)
    clock = _Clock()

    def emit(kind: str, info: Mapping[str, Any]) -> None:
        if kind == "trial_end":
            out.ends.append(TrialEvent(clock.now, len(out.epochs), info["number"], info["state"], info["value"]))
        if on_event is not None:
            on_event(kind, info)

    driver = _Driver(spec, study, tracker if tracker is not None else NullTracker(), emit)
    n_trials = trials if trials is not None else (spec.budget.trials if max_epochs is None else sys.maxsize)
    driver.dispatch(n_trials, (spec.resources.cpus_per_trial, 0.0, float(n_workers)))
    time_limit = max_time_s if max_time_s is not None else spec.budget.timeout_s
    rules = BookRules(spec.objectives[0].metric, spec.objectives[0].direction == "maximize",
                      spec.train.early_stopping.min_delta)  # no patience: as for a custom trainable
    free = list(range(n_workers - 1, -1, -1))  # worker slots, the lowest first
    running: dict[str, _Running] = {}
    queue: list[tuple[float, int, str]] = []  # (when the trial's current epoch ends, tie-break, tune id)
    order = itertools.count()
    tune_ids = (f"sim_{i:05d}" for i in itertools.count())
    while True:
        # Fill idle workers, as Tune asks the searcher while a slot is free.
        while free and not driver.stop_reason and not driver.exhausted:
            tune_id = next(tune_ids)
            member = Assignment.from_config(driver.ask(tune_id)).members[0]
            curve = curve_of(dict(member.params))
            trial = _Running(member.number, curve, min(curve.n_epochs, spec.train.epochs), free.pop(), EpochBook(rules))
            running[tune_id] = trial
            if trial.n_epochs < 1:
                _end(driver, tune_id, trial, running, free)
                continue
            heapq.heappush(queue, (clock.now + trial.next_epoch(), next(order), tune_id))
        if not queue or driver.stop_reason:
            break
        when, _, tune_id = heapq.heappop(queue)
        if time_limit is not None and when > time_limit:
            clock.now = time_limit
            break
        clock.now = when
        trial = running[tune_id]
        out.epochs.append(EpochEvent(when, len(out.epochs) + 1, trial.number, trial.epoch,
                                     trial.metrics.get(rules.metric)))
        if _report_epoch(driver, tune_id, trial):
            _end(driver, tune_id, trial, running, free)
        else:
            heapq.heappush(queue, (when + trial.next_epoch(), next(order), tune_id))
        if max_epochs is not None and len(out.epochs) >= max_epochs:
            break
    out.time_s = clock.now
    out.n_interrupted = len(running)
    if running:
        driver.interrupt_running()
    return out


def trainable_curves(spec: StudySpec) -> Callable[[dict[str, Any]], Curve]:
    """A `curve_of` for `simulate_study` from the study's own `trainable`, for trainables that
    replay recorded curves (as `bench.lcbench_surrogate:replay` does): each trial's trainable runs
    here, to its end, and the epochs it reports are its curve, each taking the `epoch_time_s` it
    reports (else the time it took here). A trainable that raises gives an empty curve: FAIL.
    Trial numbers follow the driver's asks, so each trial gets the seed it would get on Ray."""
    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.custom_trainable import run_custom_trainable

    numbers = itertools.count()

    def curve_of(params: dict[str, Any]) -> Curve:
        cfg = trial_config(spec, params, next(numbers))
        try:
            rows = run_custom_trainable(cfg).history
        except Exception:  # noqa: BLE001 - the trial fails, as it would on Ray; the study goes on
            rows = []
        return RecordedCurve([{k: v for k, v in r.items() if k not in ("epoch", "epoch_time_s")} for r in rows],
                             [float(r.get("epoch_time_s", 0.0)) for r in rows])

    return curve_of


# ---------------------------------------------------------------- helpers


@dataclass
class _Clock:
    now: float = 0.0  # simulated seconds since the study started


@dataclass
class _Running:
    """A trial on a simulated worker: its curve, the epoch it is in, its book of best epochs."""

    number: int
    curve: Curve
    n_epochs: int
    slot: int
    book: EpochBook
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    best_metrics: dict[str, float] = field(default_factory=dict)
    final: TrialEnd | None = None

    @property
    def place(self) -> dict[str, str]:
        """Where it runs, as a report says it (`protocol.PLACE_KEYS`): its simulated worker."""
        return {"node_id": f"sim-worker-{self.slot}"}

    def next_epoch(self) -> float:
        """Start the next epoch; returns its duration in seconds."""
        self.epoch += 1
        metrics, seconds = self.curve.at(self.epoch)
        self.metrics = {**metrics, "epoch_time_s": float(seconds)}
        self.times.append(float(seconds))
        return float(seconds)

    def completed(self) -> TrialEnd:
        if self.book.best_epoch is None:
            return TrialEnd.failed(f"the curve never had the objective {self.book.rules.metric!r}")
        return TrialEnd(state="COMPLETE", epochs_run=self.epoch, best_epoch=self.book.best_epoch,
                        epoch_time_s=statistics.median(self.times), best_metrics=dict(self.best_metrics))


def _report_epoch(driver: _Driver, tune_id: str, trial: _Running) -> bool:
    """Report the epoch the trial just ended, as the custom-trainable harness does. True: the
    trial ends here (pruned, its objective non-finite, or its last epoch), `trial.final` set."""
    value = trial.metrics.get(trial.book.rules.metric)
    verdict = trial.book.update(trial.epoch, value) if value is not None else None
    if verdict is not None and verdict.diverged:
        # The harness fails the trial before the epoch reaches the driver.
        trial.final = TrialEnd.failed(f"{verdict.diverged} became {value} at epoch {trial.epoch}: "
                                      "the curve has a non-finite objective")
        return True
    if verdict is not None and verdict.improved:
        trial.best_metrics = dict(trial.metrics)
    if driver.on_result(tune_id, to_result(EpochReport(trial.epoch, trial.metrics), trial.place)):
        return True  # pruned: a pruned trial sends no last report
    if trial.epoch < trial.n_epochs:
        return False
    trial.final = trial.completed()
    return True


def _end(driver: _Driver, tune_id: str, trial: _Running, running: dict[str, _Running], free: list[int]) -> None:
    """The trial's worker is done with it: its last report (unless pruned), then Tune's completion."""
    if trial.final is not None:
        driver.on_result(tune_id, to_result(trial.final, trial.place))
    elif trial.epoch == 0:
        driver.on_result(tune_id, to_result(TrialEnd.failed("the curve has no epoch"), trial.place))
    driver.on_complete(tune_id, None)
    del running[tune_id]
    free.append(trial.slot)
    free.sort(reverse=True)
