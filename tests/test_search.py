"""Tests for dlsearch.search and dlsearch.config.trial_config: define-by-run sampling, samplers, pruners, trial configs.

Everything runs on in-memory Optuna studies with seeded samplers and hand-told values: no training.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest

from dlsearch.config.trial_config import TrialConfig, trial_config, trial_seed
from dlsearch.search.space import directions, grid_space, make_pruner, make_sampler, suggest
from dlsearch.config.spec import CategoricalDim, FloatDim, IntDim, StudySpec, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "studies" / "mnist.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE: dict[str, Any] = {
    "name": "tiny",
    "seed": 7,
    "data": {"dataset": "digits"},
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "search": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
        "model.depth": {"type": "int", "low": 1, "high": 3},
        "model.activation": {"type": "categorical", "choices": ["relu", "tanh"]},
    },
}
TWO_OBJECTIVES = [
    {"metric": "val_accuracy", "direction": "maximize"},
    {"metric": "epoch_time_s", "direction": "minimize"},
]


def _spec(**changes: Any) -> StudySpec:
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(changes))
    return spec_from_dict(raw)


def _ask_many(spec: StudySpec, n: int, sampler: optuna.samplers.BaseSampler) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=sampler, directions=directions(spec))
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, spec)
        assert params == trial.params  # what suggest returns is what Optuna recorded
        study.tell(trial, [0.5] * len(spec.objectives) if len(spec.objectives) > 1 else 0.5)
        out.append(params)
    return out


def _in_bounds(dim: Any, value: Any) -> bool:
    if isinstance(dim, CategoricalDim):
        return value in dim.choices
    if isinstance(dim, IntDim):
        return isinstance(value, int) and dim.low <= value <= dim.high and (value - dim.low) % dim.step == 0
    return isinstance(value, float) and dim.low <= value <= dim.high


# ---------------------------------------------------------------- suggest (define-by-run)


@pytest.fixture(scope="module")
def mnist() -> StudySpec:
    return load_spec(MNIST)


@pytest.fixture(scope="module")
def mnist_samples(mnist: StudySpec) -> list[dict[str, Any]]:
    return _ask_many(mnist, 40, optuna.samplers.RandomSampler(seed=0))


def test_conditional_dimension_appears_exactly_when_its_condition_holds(mnist_samples: list[dict[str, Any]]) -> None:
    optimizers = [p["train.optimizer"] for p in mnist_samples]
    assert {"adam", "sgd"} <= set(optimizers), "40 random draws should see both optimizers"
    for params in mnist_samples:
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd"), params


def test_unconditional_dimensions_are_always_sampled(mnist: StudySpec, mnist_samples: list[dict[str, Any]]) -> None:
    always = {k for k, d in mnist.search.items() if not d.when}
    for params in mnist_samples:
        assert always <= set(params)
        assert set(params) <= set(mnist.search)


def test_sampled_values_respect_their_dimensions(mnist: StudySpec, mnist_samples: list[dict[str, Any]]) -> None:
    for params in mnist_samples:
        for key, value in params.items():
            dim = mnist.search[key]
            assert _in_bounds(dim, value), (key, value)
            if not isinstance(dim, CategoricalDim) and dim.log:
                assert value > 0
    lrs = [p["train.lr"] for p in mnist_samples]
    # log-uniform over four decades: some draws land in each end decade
    assert min(lrs) < 1e-3 and max(lrs) > 1e-2


def test_suggest_is_reproducible_with_a_seeded_sampler(mnist: StudySpec) -> None:
    first = _ask_many(mnist, 10, optuna.samplers.RandomSampler(seed=3))
    again = _ask_many(mnist, 10, optuna.samplers.RandomSampler(seed=3))
    assert first == again


def test_condition_on_a_dimension_listed_later_still_holds() -> None:
    spec = _spec(search={
        "train.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"train.optimizer": ["sgd", "rmsprop"]}},
        "train.optimizer": {"type": "categorical", "choices": ["adam", "sgd", "rmsprop"]},
    })
    for params in _ask_many(spec, 30, optuna.samplers.RandomSampler(seed=1)):
        assert ("train.momentum" in params) == (params["train.optimizer"] in ("sgd", "rmsprop")), params


@pytest.mark.parametrize(("optimizer", "sampled"), [("sgd", True), ("adam", False)])
def test_condition_on_a_pinned_key_reads_the_fixed_value(mnist: StudySpec, optimizer: str, sampled: bool) -> None:
    spec = load_spec(MNIST, [f"train.optimizer={optimizer}"])
    assert "train.optimizer" not in spec.search
    for params in _ask_many(spec, 5, optuna.samplers.RandomSampler(seed=0)):
        assert ("train.momentum" in params) is sampled


def test_stepped_and_log_int_dimensions() -> None:
    spec = _spec(search={
        "model.width": {"type": "int", "low": 16, "high": 256, "log": True},
        "model.depth": {"type": "int", "low": 1, "high": 7, "step": 2},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    })
    for params in _ask_many(spec, 20, optuna.samplers.RandomSampler(seed=0)):
        assert 16 <= params["model.width"] <= 256
        assert params["model.depth"] in (1, 3, 5, 7)
        assert min(abs(params["model.dropout"] - v) for v in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)) < 1e-9


# ---------------------------------------------------------------- trial_config


def test_trial_config_merges_sampled_params(mnist: StudySpec) -> None:
    params = {"train.lr": 0.0123, "model.dropout": 0.33, "train.optimizer": "sgd", "train.momentum": 0.8}
    cfg = trial_config(mnist, params, number=4)
    assert isinstance(cfg, TrialConfig)
    assert cfg.train.lr == 0.0123
    assert cfg.model.dropout == 0.33
    assert (cfg.train.optimizer, cfg.train.momentum) == ("sgd", 0.8)
    # keys the trial did not sample keep the study's values
    assert cfg.train.epochs == mnist.train.epochs == 20
    assert cfg.train.batch_size == mnist.train.batch_size
    assert cfg.model.depth == mnist.model.depth
    assert cfg.data == mnist.data
    assert cfg.params == params
    assert (cfg.study, cfg.number, cfg.data_seed) == ("mnist-mlp", 4, 42)
    assert cfg.seed == trial_seed(42, 4)
    assert cfg.objective.metric == "val_accuracy"
    assert cfg.base_dir == str(MNIST.resolve().parent)
    # the study itself is untouched
    assert mnist.train.lr == 1e-3


def test_trial_config_from_suggest(mnist: StudySpec, mnist_samples: list[dict[str, Any]]) -> None:
    for number, params in enumerate(mnist_samples[:5]):
        cfg = trial_config(mnist, params, number)
        assert cfg.train.lr == params["train.lr"]
        assert cfg.model.init == params["model.init"]
        assert cfg.train.batch_size == params["train.batch_size"]


def test_trial_config_nested_param() -> None:
    cfg = trial_config(_spec(), {"train.early_stopping.patience": 2})
    assert cfg.train.early_stopping.patience == 2
    assert cfg.train.early_stopping.min_delta == 0.0


def test_flat_has_every_key_under_its_dotted_path(mnist: StudySpec) -> None:
    cfg = trial_config(mnist, {"model.dropout": 0.25}, number=1)
    flat = cfg.flat()
    assert flat["model.dropout"] == 0.25
    assert flat["train.early_stopping.patience"] == 5
    assert flat["train.early_stopping.min_delta"] == 0.0
    assert flat["train.lr"] == 1e-3
    assert flat["data.dataset"] == "mnist"
    assert flat["seed"] == cfg.seed
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in flat.values())
    assert "train.early_stopping" not in flat  # sections are flattened, not logged as dicts
    assert cfg.to_dict()["train"]["early_stopping"]["patience"] == 5


def test_trial_seed_is_deterministic_and_spread() -> None:
    assert trial_seed(42, 0) == trial_seed(42, 0)
    seeds = [trial_seed(42, n) for n in range(200)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds)
    assert trial_seed(42, 3) != trial_seed(43, 3)
    assert trial_seed(0, 1) != trial_seed(1, 0)


def test_trial_config_seed_depends_on_study_seed_and_number() -> None:
    a, b = _spec(seed=1), _spec(seed=2)
    assert trial_config(a, {}, 0).seed == trial_config(a, {}, 0).seed
    assert trial_config(a, {}, 0).seed != trial_config(a, {}, 1).seed
    assert trial_config(a, {}, 0).seed != trial_config(b, {}, 0).seed
    # every trial of a study sees the same split
    assert trial_config(a, {}, 0).data_seed == trial_config(a, {}, 9).data_seed == 1


# ---------------------------------------------------------------- samplers

GRID_SEARCH = {
    "model.depth": {"type": "int", "low": 1, "high": 3},
    "model.activation": {"type": "categorical", "choices": ["relu", "tanh"]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
}
SAMPLERS = {
    "random": ({"type": "random"}, {}),
    "grid": ({"type": "grid"}, {"search": GRID_SEARCH}),
    "tpe": ({"type": "tpe", "n_startup_trials": 2}, {}),
    "cmaes": ({"type": "cmaes", "warn_independent_sampling": False}, {}),
    "gp": ({"type": "gp"}, {}),
    "qmc": ({"type": "qmc"}, {}),
    "nsga2": ({"type": "nsga2"}, {"objective": TWO_OBJECTIVES, "pruner": {"type": "none"}}),
}
SAMPLER_CLASSES = {
    "random": "RandomSampler", "grid": "GridSampler", "tpe": "TPESampler", "cmaes": "CmaEsSampler",
    "gp": "GPSampler", "qmc": "QMCSampler", "nsga2": "NSGAIISampler",
}


def _sampler_spec(kind: str) -> StudySpec:
    sampler, changes = SAMPLERS[kind]
    return _spec(sampler=sampler, **changes)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_sampler_constructs_and_runs(kind: str) -> None:
    spec = _sampler_spec(kind)
    sampler = make_sampler(spec)
    assert type(sampler).__name__ == SAMPLER_CLASSES[kind]
    samples = _ask_many(spec, 3, sampler)
    assert len(samples) == 3
    for params in samples:
        assert set(params) == set(spec.search)
        assert all(_in_bounds(spec.search[k], v) for k, v in params.items()), params
    if kind == "grid":
        assert len({tuple(sorted(p.items())) for p in samples}) == 3  # a grid never repeats a point


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_sampler_is_seeded_from_the_study(kind: str) -> None:
    spec = _sampler_spec(kind)
    assert _ask_many(spec, 3, make_sampler(spec)) == _ask_many(spec, 3, make_sampler(spec))


def test_sampler_options_reach_optuna() -> None:
    sampler = make_sampler(_spec(sampler={"type": "tpe", "n_startup_trials": 3}))
    assert sampler._n_startup_trials == 3  # noqa: SLF001 - no public accessor


def test_directions_follow_the_objectives() -> None:
    assert directions(_spec()) == ["maximize"]
    assert directions(_spec(objective=TWO_OBJECTIVES, pruner={"type": "none"})) == ["maximize", "minimize"]


# ---------------------------------------------------------------- pruners

PRUNERS = {
    "none": ({"type": "none"}, "NopPruner"),
    "median": ({"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2}, "MedianPruner"),
    "percentile": ({"type": "percentile", "percentile": 25}, "PercentilePruner"),
    "successive_halving": ({"type": "successive_halving"}, "SuccessiveHalvingPruner"),
    "asha": ({"type": "asha", "reduction_factor": 3}, "SuccessiveHalvingPruner"),
    "hyperband": ({"type": "hyperband", "min_resource": 1, "max_resource": 20}, "HyperbandPruner"),
    "patient": ({"type": "patient", "patience": 2, "wrapped": {"type": "median"}}, "PatientPruner"),
    "threshold": ({"type": "threshold", "lower": 0.1}, "ThresholdPruner"),
    "wilcoxon": ({"type": "wilcoxon"}, "WilcoxonPruner"),
}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", list(PRUNERS))
def test_every_pruner_constructs(kind: str) -> None:
    options, cls = PRUNERS[kind]
    pruner = make_pruner(_spec(pruner=options))
    assert type(pruner).__name__ == cls


def test_default_search_is_tpe_with_asha_rungs_tied_to_the_epochs() -> None:
    """The default (chosen on LCBench, BENCHMARKS.md): TPE after as many random trials as run at
    once, at least 3; successive halving whose first rung is at 15% of the most epochs a trial
    runs, a third going on at each rung."""
    for concurrency, startup in ((1, 3), (3, 3), (16, 16)):
        sampler = make_sampler(_spec(), concurrency)
        assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == startup
    assert make_sampler(_spec(sampler={"type": "tpe", "n_startup_trials": 7}), 16)._n_startup_trials == 7
    for epochs, searched, first in ((52, None, 8), (20, None, 3), (3, None, 1), (10, [5, 40], 6)):
        changes: dict[str, Any] = {"train": {"epochs": epochs}}
        if searched:
            changes["search"] = {**BASE["search"], "train.epochs": {"type": "int", "low": searched[0],
                                                                    "high": searched[1]}}
        pruner = make_pruner(_spec(**changes))
        assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
        assert (pruner._min_resource, pruner._reduction_factor) == (first, 3), (epochs, searched)
    # The study file's own options win over the defaults tied to the epochs.
    pruner = make_pruner(_spec(pruner={"type": "asha", "min_resource": 4, "reduction_factor": 2}))
    assert (pruner._min_resource, pruner._reduction_factor) == (4, 2)


def test_asha_promotes_the_best_third_at_each_rung() -> None:
    """Rungs at 1 and 3 of 6 epochs (15% of 6 rounds to 1): trials that report in order, each
    better than the last, all pass; a trial below the rung's best third is pruned there."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(_spec(train={"epochs": 6})))
    for value in (0.5, 0.6, 0.7):
        trial = study.ask()
        for epoch in range(1, 7):
            trial.report(value, epoch)
            assert not trial.should_prune()
        study.tell(trial, value)
    worst = study.ask()
    worst.report(0.1, 1)
    assert worst.should_prune()


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_patient_pruner_wraps_the_named_pruner() -> None:
    pruner = make_pruner(_spec(pruner=PRUNERS["patient"][0]))
    assert isinstance(pruner._wrapped_pruner, optuna.pruners.MedianPruner)  # noqa: SLF001
    bare = make_pruner(_spec(pruner={"type": "patient", "patience": 2}))
    assert bare._wrapped_pruner is None  # noqa: SLF001 - patience alone, no inner rule


def test_threshold_pruner_prunes_below_its_lower_bound() -> None:
    spec = _spec(pruner=PRUNERS["threshold"][0])
    study = optuna.create_study(pruner=make_pruner(spec), direction="maximize")
    low, high = study.ask(), study.ask()
    low.report(0.05, step=0)
    high.report(0.5, step=0)
    assert low.should_prune() and not high.should_prune()


def test_median_pruner_prunes_a_scripted_bad_curve() -> None:
    spec = _spec(pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1})
    study = optuna.create_study(pruner=make_pruner(spec), direction="maximize")
    for curve in ([0.5, 0.6, 0.7], [0.55, 0.65, 0.75]):
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        study.tell(trial, curve[-1])
    bad = study.ask()
    bad.report(0.1, 0)
    assert not bad.should_prune()  # still in warm-up
    bad.report(0.1, 1)
    assert bad.should_prune()


# ---------------------------------------------------------------- grid_space


def test_grid_space_values() -> None:
    spec = _spec(sampler={"type": "grid"}, search={
        "model.depth": {"type": "int", "low": 1, "high": 7, "step": 2},
        "model.width": {"type": "int", "low": 32, "high": 34},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
        "train.lr": {"type": "float", "low": 0.25, "high": 1.0, "step": 0.25},
        "model.activation": {"type": "categorical", "choices": ["relu", "gelu", "tanh"]},
    })
    space = grid_space(spec)
    assert space["model.depth"] == [1, 3, 5, 7]
    assert space["model.width"] == [32, 33, 34]
    # exact values: 0.1 * 3 would be 0.30000000000000004, just above `high`
    assert space["model.dropout"] == [0.0, 0.1, 0.2, 0.3]
    assert space["train.lr"] == [0.25, 0.5, 0.75, 1.0]
    assert space["model.activation"] == ["relu", "gelu", "tanh"]
    assert list(space) == list(spec.search)


def test_grid_sampler_visits_every_point_without_out_of_range_values() -> None:
    spec = _spec(sampler={"type": "grid"}, search={
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
        "model.activation": {"type": "categorical", "choices": ["relu", "tanh"]},
    })
    study = optuna.create_study(sampler=make_sampler(spec), direction="maximize")
    seen = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, spec)
        seen.append((params["model.dropout"], params["model.activation"]))
        return 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a grid value falls outside its distribution
        study.optimize(objective, n_trials=20)
    assert len(seen) == 8  # the grid sampler stops the study once every point is done
    assert {d for d, _ in seen} == {0.0, 0.1, 0.2, 0.3}
    assert all(not math.isnan(d) for d, _ in seen)


def test_float_dims_in_space_are_float_dims() -> None:
    spec = _spec()
    assert isinstance(spec.search["train.lr"], FloatDim)
    assert isinstance(spec.search["model.depth"], IntDim)
    assert isinstance(spec.search["model.activation"], CategoricalDim)
