"""The plots a finished run logs, read back through matplotlib's objects (not pixels).

One in-memory Optuna study sampled through the study's own search space (`search.space.suggest`):
complete trials, trials pruned after 1-3 epochs with their curves, a failed one; a log-float, an int,
two categorical params and a conditional one (`train.momentum`, only for sgd).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from matplotlib.colors import to_rgb
from optuna.trial import TrialState

from dlsearch.config.spec import StudySpec, load_spec
from dlsearch.report.leaderboard import importances, write_plots, write_study_artifacts
from dlsearch.report.plots import (
    PLOTS,
    ROUGH_IMPORTANCES_BELOW,
    learning_curves,
    optimization_history,
    parallel_coordinates,
    param_importances,
)
from dlsearch.search.space import suggest
from tests.studies import write_study

SEARCH = {
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 0.3, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "train.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"train.optimizer": "sgd"}},
    "model.width": {"type": "categorical", "choices": [16, 32, 64]},
    "model.depth": {"type": "int", "low": 1, "high": 3},
}
EPOCHS = 6
# (lr, optimizer, momentum, width, depth, how it ends): "complete", "pruned@<epoch>" or "fail".
TRIALS = [
    (1e-2, "adam", None, 32, 2, "complete"),
    (1e-3, "sgd", 0.9, 64, 1, "complete"),
    (2e-1, "adam", None, 16, 3, "pruned@1"),
    (3e-3, "adam", None, 64, 2, "complete"),
    (1e-4, "sgd", 0.6, 16, 1, "pruned@2"),
    (5e-2, "adam", None, 32, 3, "fail"),
    (8e-3, "sgd", 0.95, 32, 2, "complete"),
    (3e-4, "adam", None, 16, 1, "pruned@3"),
    (2e-2, "adam", None, 64, 3, "complete"),
    (1e-1, "sgd", 0.7, 64, 2, "pruned@2"),
    (5e-3, "adam", None, 32, 1, "complete"),
]


def _final(lr: float, depth: int) -> float:
    """A made-up accuracy, best near lr = 1e-2 and depth 2."""
    return 0.97 - 0.12 * abs(math.log10(lr) + 2) - 0.02 * abs(depth - 2)


def _curve(final: float, epochs: int) -> dict[int, float]:
    return {epoch: final * (1 - 0.4 ** epoch) for epoch in range(1, epochs + 1)}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> StudySpec:
    folder = tmp_path_factory.mktemp("plots")
    return load_spec(write_study(folder, search=SEARCH, train={"epochs": EPOCHS}))


def _study(spec: StudySpec, trials: list[tuple[Any, ...]] = TRIALS, sign: float = 1.0) -> optuna.Study:
    """The trials of `trials`, asked and told as the driver does: params through the study's search space.
    `sign` -1: the values negated and minimized (as for a loss)."""
    study = optuna.create_study(study_name=spec.name, direction="maximize" if sign > 0 else "minimize")
    for lr, optimizer, momentum, width, depth, end in trials:
        fixed = {"train.lr": lr, "train.optimizer": optimizer, "model.width": width, "model.depth": depth}
        study.enqueue_trial(fixed | ({"train.momentum": momentum} if momentum is not None else {}))
        trial = study.ask()
        assert suggest(trial, spec) == trial.params  # the conditional key only for sgd
        if end == "fail":
            study.tell(trial, state=TrialState.FAIL)
            continue
        epochs = int(end.partition("@")[2] or EPOCHS)
        for epoch, value in _curve(_final(lr, depth), epochs).items():
            trial.report(sign * value, epoch)
        if end.startswith("pruned"):
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, sign * _final(lr, depth) * (1 - 0.4 ** EPOCHS))
    return study


@pytest.fixture(scope="module")
def study(spec: StudySpec) -> optuna.Study:
    return _study(spec)


def _numbers(study: optuna.Study, state: TrialState) -> list[int]:
    return [t.number for t in study.trials if t.state == state]


def test_the_run_writes_every_plot_as_png(spec: StudySpec, study: optuna.Study, tmp_path: Path) -> None:
    written = write_study_artifacts(spec, study, tmp_path)
    assert [p.name for p in written] == ["leaderboard.csv", "importances.json", *PLOTS]
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # write_plots alone (its callers before plots.py) still writes them
    assert [p.name for p in write_plots(spec, study, tmp_path / "again")] == list(PLOTS)


def test_history_shows_pruned_trials_at_their_last_value(spec: StudySpec, study: optuna.Study) -> None:
    ax = optimization_history(spec, study).axes[0]
    points = {c.get_label().split(":")[0]: c for c in ax.collections}
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in study.trials
              if t.state == TrialState.PRUNED]
    assert [tuple(p) for p in points["pruned"].get_offsets()] == pytest.approx(pruned)
    assert [p[0] for p in points["complete"].get_offsets()] == _numbers(study, TrialState.COMPLETE)
    assert [p[0] for p in points["failed (no value)"].get_offsets()] == _numbers(study, TrialState.FAIL)
    # each pruned point is labelled with the epoch it stopped at
    assert [a.get_text() for a in ax.texts] == [str(max(t.intermediate_values)) for t in study.trials
                                                 if t.state == TrialState.PRUNED]
    best_line = next(line for line in ax.lines if line.get_label().startswith("best so far"))
    assert best_line.get_ydata()[-1] == pytest.approx(study.best_value)
    assert "11 trials: 6 complete, 4 pruned, 1 failed" in ax.get_title()
    assert points["best"].get_label() == f"best: trial {study.best_trial.number}, {study.best_value:.4g}"


def test_parallel_coordinates_reads_like_its_search_space(spec: StudySpec, study: optuna.Study) -> None:
    fig = parallel_coordinates(spec, study)
    fig.draw_without_rendering()  # resolves the ticks
    main = fig.axes[0]
    axes = {a.get_label(): a.yaxis for a in main.child_axes}
    titles = [t.get_text() for t in main.get_xticklabels()]
    assert titles[0] == "val_accuracy\n(objective)"
    # params every trial has in the study file's order, then the conditional one, with its condition
    assert [t.split("\n")[0] for t in titles[1:]] == ["train.lr", "train.optimizer", "model.width",
                                                      "model.depth", "train.momentum"]
    assert titles[-1] == "train.momentum\nonly if train.optimizer = sgd"

    def labels(name: str) -> list[str]:
        return [t.get_text() for t in axes[name].get_majorticklabels()]

    assert labels("train.optimizer") == ["adam", "sgd"]
    assert labels("model.width") == ["16", "32", "64"]
    assert labels("model.depth") == ["1", "2", "3"]  # integers, not 1.0 ... 3.0
    low, high = axes["train.lr"].get_view_interval()
    decades = [v for v in axes["train.lr"].get_majorticklocs() if low <= v <= high]
    assert decades == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])  # a log axis

    # a trial without the conditional param draws no line to its axis
    last = len(titles) - 1
    to_momentum = [c for c in main.collections for seg in c.get_segments() if seg[-1][0] == last]
    has_momentum = [t for t in study.trials if "train.momentum" in t.params and t.state != TrialState.FAIL]
    assert len(to_momentum) == len(has_momentum) == 4

    # one line per complete trial from the objective axis, none near-white on white; the best the darkest
    lines = {c.get_label(): c for c in main.collections}
    best = lines[f"best: trial {study.best_trial.number}"]
    from_objective = [seg for c in (lines["complete"], best) for seg in c.get_segments() if seg[0][0] == 0]
    assert len(from_objective) == len(_numbers(study, TrialState.COMPLETE))
    others = [_luminance(c) for c in lines["complete"].get_colors()]
    assert max(others) < 0.75
    assert _luminance(best.get_colors()[0]) <= min(others)
    assert best.get_linewidths()[0] > lines["complete"].get_linewidths()[0]


def test_parallel_coordinates_colour_the_lowest_loss_darkest(spec: StudySpec) -> None:
    study = _study(spec, sign=-1.0)
    lines = {c.get_label(): c for c in parallel_coordinates(spec, study).axes[0].collections}
    best = lines.pop(f"best: trial {study.best_trial.number}")
    assert _luminance(best.get_colors()[0]) <= min(_luminance(c) for c in lines["complete"].get_colors())


def test_importances_say_how_many_trials_they_come_from(spec: StudySpec, study: optuna.Study) -> None:
    found = importances(study)
    fig = param_importances(spec, study, found)
    ax = fig.axes[0]
    assert "from 6 complete trials" in ax.get_title()
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "Of 11 trials, only the 6 complete ones have a final val_accuracy (4 pruned and 1 failed left out)" in caption
    assert f"fewer than {ROUGH_IMPORTANCES_BELOW} complete trials, read these as rough" in caption
    bars = {t.get_text().split("  ")[0]: t.get_text() for t in ax.get_yticklabels()}
    assert set(bars) == set(found)
    assert bars["train.momentum"] == "train.momentum  (in 2 of 6)"  # only the complete sgd trials have it


def test_learning_curves_mark_where_pruned_trials_stopped(spec: StudySpec, study: optuna.Study) -> None:
    ax = learning_curves(spec, study).axes[0]
    crosses = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "x"]
    assert crosses == [(max(t.intermediate_values), t.intermediate_values[max(t.intermediate_values)])
                       for t in study.trials if t.state == TrialState.PRUNED]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "complete", "pruned", "failed", f"best (trial {study.best_trial.number})"]


def test_a_study_without_complete_trials_gets_the_plots_it_can_have(spec: StudySpec, tmp_path: Path) -> None:
    study = _study(spec, [t for t in TRIALS if t[-1] != "complete"])
    assert [p.name for p in write_plots(spec, study, tmp_path)] == ["optimization_history.png",
                                                                     "learning_curves.png"]


def test_several_objectives_get_the_learning_curves_as_before(spec: StudySpec, tmp_path: Path) -> None:
    # Optuna takes no intermediate values with several objectives: the driver runs every trial to its end.
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i in range(4):
        trial = study.ask()
        suggest(trial, spec)
        study.tell(trial, [0.5 + 0.1 * i, 1.0 - 0.1 * i])
    assert [p.name for p in write_study_artifacts(spec, study, tmp_path)] == [
        "leaderboard.csv", "importances.json", "learning_curves.png"]


def _luminance(color: Any) -> float:
    """Relative luminance (0 black, 1 white) of an RGB(A) colour, as WCAG defines it."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in to_rgb(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
