"""The pruning scheduler decides exactly as Optuna's own pruner driven by `study.optimize`.

Scripted learning curves go through both paths, one trial after another:
Optuna's objective loop (`report` / `should_prune` / `TrialPruned`) and our Tune
scheduler's `on_trial_result`. The Tune trial is a stand-in holding only the
`trial_id` the scheduler reads; the scheduler and the Optuna study are real.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from dlsearch.backend.scheduler import OptunaPruningScheduler
from dlsearch.search.build import pruner_from

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


def scheduler_decisions(kind: str, kwargs: dict, curves: list[list[float]]) -> list[int | None]:
    """The same curves through OptunaPruningScheduler, as the dlsearch driver feeds it."""
    study = optuna.create_study(study_name="equivalence", direction="maximize",
                                pruner=pruner_from(kind, dict(kwargs)))
    live: dict[str, optuna.Trial] = {}
    scheduler = OptunaPruningScheduler("val_accuracy", live.get, final_key="dlsearch_final")
    pruned_at: list[int | None] = []
    for i, curve in enumerate(curves):
        tune_trial = _TuneTrial(f"t{i}")
        live[tune_trial.trial_id] = study.ask()
        decision_epoch = None
        for epoch, value in enumerate(curve, start=1):
            decision = scheduler.on_trial_result(None, tune_trial, {"epoch": epoch, "val_accuracy": value})
            if decision == TrialScheduler.STOP:
                decision_epoch = epoch
                break
        # the final report is not an epoch: never pruned on, never reported to Optuna
        assert scheduler.on_trial_result(None, tune_trial, {"dlsearch_final": 1, "val_accuracy": 0.0}) \
            == TrialScheduler.CONTINUE
        trial = live.pop(tune_trial.trial_id)
        if decision_epoch is None:
            study.tell(trial, curve[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        pruned_at.append(decision_epoch)
    return pruned_at


@pytest.mark.parametrize(("kind", "kwargs"), PRUNERS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(PRUNERS)])
def test_scheduler_prunes_exactly_like_optuna(kind: str, kwargs: dict) -> None:
    curves = scripted_curves()
    expected = optuna_decisions(kind, kwargs, curves)
    assert scheduler_decisions(kind, kwargs, curves) == expected
    if kind not in ("none",):
        assert any(e is not None for e in expected), f"{kind}: the scripted curves should prune something"


def test_unknown_trial_and_results_without_epoch_continue() -> None:
    scheduler = OptunaPruningScheduler("val_accuracy", {}.get)
    assert scheduler.on_trial_result(None, _TuneTrial("x"), {"epoch": 1, "val_accuracy": 0.1}) \
        == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, _TuneTrial("x"), {"val_accuracy": 0.1}) == TrialScheduler.CONTINUE
    assert scheduler.pruned == {}
