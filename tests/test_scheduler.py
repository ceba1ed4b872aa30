"""The pruning scheduler decides exactly as Optuna's own pruner driven by `study.optimize`.

Scripted learning curves go through both paths, one trial after another:
Optuna's objective loop (`report` / `should_prune` / `TrialPruned`) and our Tune
scheduler's `on_trial_result`, which hands each result to the driver's one prune
decision (`_Driver.on_result`, with a real MLflow tracker). The Tune trial is a
stand-in holding only the `trial_id` the scheduler reads; the scheduler, the driver,
the Optuna study and the MLflow store are real.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from dlsearch.backend.scheduler import DriverScheduler
from dlsearch.config.spec import load_spec
from dlsearch.config.trial_config import trial_config
from dlsearch.protocol import EpochReport, TrialEnd, to_result
from dlsearch.search.build import pruner_from
from dlsearch.tracking.tracker import MlflowTracker
from dlsearch.tuner.runner import TrialRecord, _Driver
from tests.studies import write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_EPOCHS = 12


def scripted_curves(n: int = 30, seed: int = 0) -> list[list[float]]:
    """Saturating accuracy curves with different ceilings, speeds and noise."""
    rng = random.Random(seed)
    curves = []
    for _ in range(n):
        ceiling, speed = rng.uniform(0.3, 0.99), rng.uniform(0.1, 0.8)
        curves.append([ceiling * (1 - math.exp(-speed * e)) + rng.gauss(0, 0.01) for e in range(1, N_EPOCHS + 1)])
    return curves


PRUNERS = [
    ("median", {"n_startup_trials": 3, "n_warmup_steps": 2}),
    ("median", {"n_startup_trials": 1, "n_warmup_steps": 0, "interval_steps": 3}),
    ("percentile", {"percentile": 30.0, "n_startup_trials": 2}),
    ("successive_halving", {"min_resource": 1, "reduction_factor": 3}),
    ("hyperband", {"min_resource": 1, "max_resource": N_EPOCHS, "reduction_factor": 3}),
    ("patient", {"patience": 2, "wrapped": {"type": "median", "n_startup_trials": 2}}),
    ("threshold", {"lower": 0.5, "n_warmup_steps": 3}),
    ("wilcoxon", {"p_threshold": 0.1}),
    ("none", {}),
]


def optuna_decisions(kind: str, kwargs: dict, curves: list[list[float]]) -> list[int | None]:
    """The epoch each curve is pruned at (None: never) under Optuna's own optimize loop."""
    study = optuna.create_study(study_name="equivalence", direction="maximize",
                                pruner=pruner_from(kind, dict(kwargs)))
    pruned_at: list[int | None] = []

    def objective(trial: optuna.Trial) -> float:
        curve = curves[trial.number]
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, step=epoch)
            if trial.should_prune():
                pruned_at.append(epoch)
                raise optuna.TrialPruned()
        pruned_at.append(None)
        return curve[-1]

    study.optimize(objective, n_trials=len(curves))
    return pruned_at


@dataclass
class _TuneTrial:
    trial_id: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scheduler")


def _driver(store: Path, name: str, study: optuna.Study) -> _Driver:
    spec = load_spec(write_study(store, filename=f"{name}.yaml", name=name))
    tracker = MlflowTracker(spec, name)
    tracker.open()
    return _Driver(spec, study, tracker, lambda kind, info: None)


def scheduler_decisions(kind: str, kwargs: dict, curves: list[list[float]], store: Path) -> list[int | None]:
    """The same curves through DriverScheduler and the driver, as Tune feeds them."""
    study = optuna.create_study(study_name="equivalence", direction="maximize",
                                pruner=pruner_from(kind, dict(kwargs)))
    driver = _driver(store, f"equivalence-{kind}-{len(kwargs)}-{abs(hash(str(kwargs))) % 1000}", study)
    scheduler = DriverScheduler(driver.on_result)
    pruned_at: list[int | None] = []
    for i, curve in enumerate(curves):
        tune_trial = _TuneTrial(f"t{i}")
        asked = study.ask()
        cfg = trial_config(driver.spec, {}, asked.number)
        driver.records[tune_trial.trial_id] = TrialRecord(asked.number, asked, cfg, driver.tracker.start(cfg))
        decision_epoch = None
        for epoch, value in enumerate(curve, start=1):
            result = to_result(EpochReport(epoch, {"val_accuracy": value}))
            decision = scheduler.on_trial_result(None, tune_trial, result)
            if decision == TrialScheduler.STOP:
                decision_epoch = epoch
                break
        # the final report is not an epoch: never pruned on, never reported to Optuna
        end = TrialEnd(state="COMPLETE", best_metrics={"val_accuracy": 0.0})
        assert scheduler.on_trial_result(None, tune_trial, to_result(end)) == TrialScheduler.CONTINUE
        trial = driver.records.pop(tune_trial.trial_id).optuna_trial
        if decision_epoch is None:
            study.tell(trial, curve[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        pruned_at.append(decision_epoch)
    return pruned_at


@pytest.mark.parametrize(("kind", "kwargs"), PRUNERS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(PRUNERS)])
def test_scheduler_prunes_exactly_like_optuna(kind: str, kwargs: dict, store: Path) -> None:
    curves = scripted_curves()
    expected = optuna_decisions(kind, kwargs, curves)
    assert scheduler_decisions(kind, kwargs, curves, store) == expected
    if kind not in ("none",):
        assert any(e is not None for e in expected), f"{kind}: the scripted curves should prune something"


def test_unknown_trial_and_results_without_epoch_continue(store: Path) -> None:
    study = optuna.create_study(study_name="unknown", direction="maximize", pruner=pruner_from("threshold",
                                                                                              {"lower": 0.5}))
    driver = _driver(store, "unknown", study)
    scheduler = DriverScheduler(driver.on_result)
    low = to_result(EpochReport(1, {"val_accuracy": 0.1}))
    assert scheduler.on_trial_result(None, _TuneTrial("x"), low) == TrialScheduler.CONTINUE  # not the driver's
    asked = study.ask()
    cfg = trial_config(driver.spec, {}, asked.number)
    driver.records["y"] = TrialRecord(asked.number, asked, cfg, driver.tracker.start(cfg))
    assert scheduler.on_trial_result(None, _TuneTrial("y"), {"val_accuracy": 0.1}) == TrialScheduler.CONTINUE
    assert driver.records["y"].pruned_at is None and driver.epochs_run == 0  # not a report of dlsearch's
    assert scheduler.on_trial_result(None, _TuneTrial("y"), low) == TrialScheduler.STOP  # below the threshold
    assert scheduler.on_trial_result(None, _TuneTrial("y"), low) == TrialScheduler.STOP  # a repeat: still stopped
    assert driver.records["y"].pruned_at == 1 and driver.epochs_run == 1
