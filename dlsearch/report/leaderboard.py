"""A study's results for people: the leaderboard, parameter importances, plots, the best config.

Everything here reads the Optuna storage (the source of truth for trial
states and values); nothing here writes to it.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from dlsearch.config.trial_config import trial_config
from dlsearch.config.spec import StudySpec

PLOTS = ("optimization_history.png", "param_importances.png", "learning_curves.png", "parallel_coordinates.png")
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


def load_study(spec: StudySpec) -> optuna.Study:
    """The newest version of the study in its Optuna storage; SpecError-free KeyError if absent."""
    from dlsearch.search.storage import open_storage, study_versions

    storage = open_storage(spec)
    versions = study_versions(spec, storage)
    if not versions:
        raise KeyError(f"no study named {spec.name!r} in {spec.tracking.optuna_storage}; run it first")
    return optuna.load_study(study_name=versions[-1], storage=storage)


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value(s), epochs run, test accuracy, params; best first."""
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        values = t.values or [None] * len(maximize)
        if len(maximize) == 1:
            row["value"] = values[0]
        else:
            row.update({f"value_{i}": v for i, v in enumerate(values)})
        row["epochs"] = t.user_attrs.get("epochs_run", len(t.intermediate_values))
        row["test_accuracy"] = t.user_attrs.get("test_accuracy")
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        row["fail_reason"] = t.user_attrs.get("fail_reason", "")
        row.update({f"params.{k}": v for k, v in t.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    value_col = "value" if "value" in df else "value_0"
    df["_order"] = df["state"].map(_STATE_ORDER).fillna(9)
    df = df.sort_values(["_order", value_col], ascending=[True, not maximize[0]], na_position="last")
    return df.drop(columns="_order").reset_index(drop=True)


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) over complete trials; empty when too few."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < 2 or len(study.directions) > 1:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}  # e.g. every complete trial has the same params


def best_config(spec: StudySpec, study: optuna.Study) -> dict[str, Any]:
    """The best trial's full resolved configuration, as sections a study file or --set can take."""
    best = study.best_trial
    cfg = trial_config(spec, best.params, best.number).to_dict()
    return {
        "trial": best.number,
        "value": best.value,
        "objective": spec.objectives[0].metric,
        "test_accuracy": best.user_attrs.get("test_accuracy"),
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "params": dict(best.params),
        "config": {k: cfg[k] for k in ("data", "model", "train")},
    }


def write_study_artifacts(spec: StudySpec, study: optuna.Study, out: Path) -> list[Path]:
    """Leaderboard CSV, importances JSON and the study's plots (PNG) into `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    table = leaderboard(study)
    table.to_csv(out / "leaderboard.csv", index=False)
    files.append(out / "leaderboard.csv")
    (out / "importances.json").write_text(json.dumps(importances(study), indent=2))
    files.append(out / "importances.json")
    files += write_plots(spec, study, out)
    return files


def write_plots(spec: StudySpec, study: optuna.Study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    single = len(study.directions) == 1
    makers = {
        "optimization_history.png": (lambda: ovm.plot_optimization_history(study)) if single else None,
        "param_importances.png": (lambda: ovm.plot_param_importances(study)) if single and importances(study) else None,
        "learning_curves.png": lambda: _learning_curves(spec, study),
        "parallel_coordinates.png": (lambda: ovm.plot_parallel_coordinate(study)) if single else None,
    }
    for name, make in makers.items():
        if make is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5.5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(out / name)
        except (ValueError, RuntimeError, IndexError):
            plt.close("all")  # too few trials for this plot
    return written


def _learning_curves(spec: StudySpec, study: optuna.Study) -> Any:
    """Every trial's objective per epoch on one axis, coloured by how the trial ended."""
    import matplotlib.pyplot as plt

    colors = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}
    fig, ax = plt.subplots()
    best = study.best_trial if study.directions and len(study.directions) == 1 and _has_complete(study) else None
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        if not steps or not all(math.isfinite(v) for v in values):
            continue
        is_best = best is not None and t.number == best.number
        ax.plot(steps, values, color="black" if is_best else colors.get(t.state.name, "gray"),
                alpha=1.0 if is_best else 0.55, linewidth=2.2 if is_best else 1.0)
    for state, color in colors.items():
        ax.plot([], [], color=color, label=state.lower())
    if best is not None:
        ax.plot([], [], color="black", linewidth=2.2, label=f"best (trial {best.number})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.objectives[0].metric)
    ax.set_title(f"{study.study_name}: learning curves of {len(study.trials)} trials")
    ax.legend(loc="best")
    return ax


def _has_complete(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
