"""Tests for dlsearch.trial.bookkeeping: the best epoch, min_delta, patience and divergence.

The unit tests feed `EpochBook` scripted curves (values exact in binary floating point, so
that "by more than min_delta" is tested at its boundary); the last tests check that the three
loops that keep a book (the built-in loop, populations, custom trainables) read
`train.early_stopping` the same way.
"""

from __future__ import annotations

import math
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from dlsearch.config.spec import load_spec, spec_from_dict
from dlsearch.config.trial_config import TrialConfig, trial_config
from dlsearch.trial.bookkeeping import LOSSES, BookRules, EpochBook, Verdict
from dlsearch.trial.custom_trainable import run_custom_trainable
from dlsearch.trial.data import load_data
from dlsearch.trial.population import train_population
from dlsearch.trial.train import train_trial


def book(maximize: bool = False, min_delta: float = 0.0, patience: int | None = None) -> EpochBook:
    return EpochBook(BookRules(metric="val_loss", maximize=maximize, min_delta=min_delta, patience=patience))


def feed(b: EpochBook, values: list[float]) -> list[Verdict]:
    return [b.update(epoch, value) for epoch, value in enumerate(values, start=1)]


# ---------------------------------------------------------------- the best epoch


@pytest.mark.parametrize("maximize", [False, True])
def test_the_first_finite_value_is_the_best_whatever_min_delta(maximize: bool) -> None:
    b = book(maximize, min_delta=100.0)
    assert b.best_epoch is None and b.best_value is None and b.epochs_without_improvement == 0
    assert b.update(1, 0.5) == Verdict(improved=True)
    assert (b.best_epoch, b.best_value, b.epochs_without_improvement) == (1, 0.5, 0)


def test_minimize_improves_only_by_more_than_min_delta() -> None:
    b = book(maximize=False, min_delta=0.25)
    verdicts = feed(b, [1.0, 0.875, 0.75, 0.5, 0.375])
    # 0.875 and 0.75 are within 0.25 of 1.0 (0.75 exactly at the boundary); 0.5 beats it; 0.375 is within 0.25 of 0.5.
    assert [v.improved for v in verdicts] == [True, False, False, True, False]
    assert (b.best_epoch, b.best_value, b.epochs_without_improvement) == (4, 0.5, 1)


def test_maximize_improves_only_by_more_than_min_delta() -> None:
    b = book(maximize=True, min_delta=0.25)
    verdicts = feed(b, [0.25, 0.5, 0.625, 0.75])
    # 0.5 is exactly min_delta above 0.25: no improvement; the best stays 0.25 until 0.625.
    assert [v.improved for v in verdicts] == [True, False, True, False]
    assert (b.best_epoch, b.best_value) == (3, 0.625)


@pytest.mark.parametrize("maximize", [False, True])
def test_a_worse_value_never_improves_and_min_delta_0_takes_any_strict_gain(maximize: bool) -> None:
    sign = 1.0 if maximize else -1.0
    b = book(maximize)
    verdicts = feed(b, [sign * 1.0, sign * 0.5, sign * 1.0000001])
    assert [v.improved for v in verdicts] == [True, False, True]
    assert b.best_epoch == 3


@pytest.mark.parametrize("maximize", [False, True])
def test_a_tie_is_no_improvement_so_the_earliest_equal_epoch_stays_best(maximize: bool) -> None:
    b = book(maximize)
    verdicts = feed(b, [0.5, 0.5, 0.5])
    assert [v.improved for v in verdicts] == [True, False, False]
    assert (b.best_epoch, b.epochs_without_improvement) == (1, 2)


# ---------------------------------------------------------------- patience


def test_patience_counts_updates_without_improvement_and_an_improvement_resets_it() -> None:
    b = book(maximize=False, patience=2)
    verdicts = feed(b, [1.0, 2.0, 0.5, 0.5, 3.0])
    assert [v.improved for v in verdicts] == [True, False, True, False, False]
    assert [v.should_stop for v in verdicts] == [False, False, False, False, True]
    assert b.should_stop and b.epochs_without_improvement == 2 and b.best_epoch == 3


def test_values_within_min_delta_use_up_the_patience() -> None:
    b = book(maximize=True, min_delta=0.25, patience=3)
    verdicts = feed(b, [0.25, 0.375, 0.5, 0.5])
    assert [v.should_stop for v in verdicts] == [False, False, False, True]
    assert b.best_epoch == 1


def test_without_patience_the_book_never_says_stop() -> None:
    b = book(patience=None)
    verdicts = feed(b, [1.0] * 50)
    assert not any(v.should_stop for v in verdicts) and not b.should_stop
    assert b.epochs_without_improvement == 49


def test_a_book_rebuilt_from_its_fields_goes_on_as_the_original() -> None:
    curve = [1.0, 0.75, 0.875, 0.5, 0.625, 0.75, 0.25]
    whole = book(min_delta=0.125, patience=3)
    expected = feed(whole, curve)
    first = book(min_delta=0.125, patience=3)
    got = feed(first, curve[:4])
    resumed = EpochBook(first.rules, best_epoch=first.best_epoch, best_value=first.best_value,
                        epochs_without_improvement=first.epochs_without_improvement)
    got += [resumed.update(epoch, value) for epoch, value in enumerate(curve[4:], start=5)]
    assert got == expected
    assert (resumed.best_epoch, resumed.best_value, resumed.epochs_without_improvement) == (
        whole.best_epoch, whole.best_value, whole.epochs_without_improvement)


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("maximize", [False, True])
def test_a_non_finite_objective_diverges_and_leaves_the_book_as_it_was(bad: float, maximize: bool) -> None:
    b = book(maximize, patience=1)
    b.update(1, 0.5)
    verdict = b.update(2, bad)
    # +inf would "improve" a maximized objective and -inf a minimized one: divergence comes first.
    assert verdict == Verdict(diverged="val_loss")
    assert (b.best_epoch, b.best_value, b.epochs_without_improvement, b.should_stop) == (1, 0.5, 0, False)


def test_a_non_finite_first_value_diverges_with_no_best() -> None:
    b = book()
    assert b.update(1, math.nan).diverged == "val_loss"
    assert b.best_epoch is None and b.best_value is None


def test_a_non_finite_loss_diverges_naming_the_first_in_order_even_when_the_objective_is_finite() -> None:
    b = book(maximize=True)
    assert b.update(1, 0.5, losses={"train_loss": 0.1, "val_loss": 0.2}) == Verdict(improved=True)
    verdict = b.update(2, 0.9, losses={"train_loss": math.nan, "val_loss": math.inf})
    assert verdict.diverged == "train_loss" and not verdict.improved
    assert b.update(3, 0.9, losses={"train_loss": 0.1, "val_loss": math.inf}).diverged == "val_loss"
    assert (b.best_epoch, b.best_value) == (1, 0.5)
    assert LOSSES == ("train_loss", "val_loss")


# ---------------------------------------------------------------- the rules


def test_rules_refuse_a_negative_min_delta_and_a_patience_below_1_naming_both() -> None:
    with pytest.raises(ValueError) as info:
        BookRules(metric="val_loss", maximize=False, min_delta=-0.5, patience=0)
    assert "`min_delta >= 0` must hold, but got (min_delta=-0.5)" in str(info.value)
    assert "`patience >= 1` must hold, but got (patience=0)" in str(info.value)


def make_cfg(*overrides: str) -> TrialConfig:
    raw = {
        "name": "test-bookkeeping",
        "seed": 0,
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "model": {"kind": "mlp", "depth": 1, "width": 16},
        "train": {"epochs": 20, "batch_size": 64, "lr": 1.0e-2, "device": "cpu"},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search": {},
    }
    return trial_config(spec_from_dict(raw, list(overrides)), {}, 0)


def test_rules_for_a_trial_read_its_objective_and_early_stopping() -> None:
    cfg = make_cfg("train.early_stopping.patience=3", "train.early_stopping.min_delta=0.01",
                   "objective.metric=val_loss", "objective.direction=minimize")
    assert BookRules.for_trial(cfg) == BookRules(metric="val_loss", maximize=False, min_delta=0.01, patience=3)
    assert BookRules.for_trial(cfg, stop_early=False).patience is None


# ---------------------------------------------------------------- the loops that keep a book


def test_the_built_in_loop_and_a_population_stop_alike_on_min_delta() -> None:
    # No accuracy can beat the first epoch's by more than 1: epoch 1 stays the best, and
    # patience 2 ends the trial after epoch 3, in the loop and in a population member alike.
    cfg = make_cfg("train.early_stopping.patience=2", "train.early_stopping.min_delta=1.0")
    data = load_data(cfg.data, cfg.data_seed)
    alone = train_trial(cfg, data)
    [member] = train_population([cfg], data)
    for result in (alone, member):
        assert (result.state, result.best_epoch, result.epochs_run) == ("COMPLETE", 1, 3)


STEPS = """
    def fit(config, report):
        # Each epoch's loss is a little lower than the last: 1.0, 0.9375, 0.875, 0.5, 0.4375.
        for epoch, loss in enumerate([1.0, 0.9375, 0.875, 0.5, 0.4375], start=1):
            report(epoch, {"loss": loss})
"""


def custom_trainable_config(tmp_path: Path, **early_stopping: float) -> TrialConfig:
    module = f"steps_{uuid.uuid4().hex[:10]}"  # a module name no other test has imported
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(STEPS))
    study = {
        "name": "bookkeeping-custom",
        "trainable": f"{module}:fit",
        "data": {"dataset": "custom"},
        "model": {"kind": "custom"},
        "train": {"epochs": 5, "early_stopping": {"patience": 1, **early_stopping}},
        "objective": {"metric": "loss", "direction": "minimize"},
        "search": {"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return trial_config(load_spec(path), {}, 0)


def test_a_custom_trainable_honours_min_delta_and_runs_its_own_epochs(tmp_path: Path) -> None:
    strict = run_custom_trainable(custom_trainable_config(tmp_path / "strict", min_delta=0.25), None)
    # 0.9375 and 0.875 are within 0.25 of 1.0, 0.4375 within 0.25 of 0.5: epoch 4 is the best.
    assert strict.state == "COMPLETE" and strict.best_epoch == 4 and strict.best_metrics["loss"] == 0.5
    # Patience 1 did not cut the trainable short: its own loop decides when to stop.
    assert strict.epochs_run == 5
    plain = run_custom_trainable(custom_trainable_config(tmp_path / "plain"), None)  # min_delta 0: any gain
    assert plain.best_epoch == 5 and plain.best_metrics["loss"] == 0.4375
