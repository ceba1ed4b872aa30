"""Concurrency with the real Ray, Optuna storage and MLflow: many trials at once in one driver,
and two drivers of different studies writing the same SQLite stores at once."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.tuner.runner import run_study
from dlsearch.config.spec import load_spec
from tests import studies

pytestmark = pytest.mark.slow

EPOCHS = 3


def write_study(folder: Path, filename: str = "study.yaml", **changes: Any) -> Path:
    """A small digits study (no download) whose stores all live in `folder`."""
    base = {"name": "concurrent-digits", "seed": 5, "train": {"epochs": EPOCHS}, "budget": {"trials": 5}}
    return studies.write_study(folder, filename, **{**base, **changes})


def finished_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state for t in trials if not t.state.is_finished()] == []
    return trials


def check_mlflow_children(client: MlflowClient, name: str, trials: list[optuna.trial.FrozenTrial]) -> None:
    """One FINISHED parent, and a FINISHED child per trial holding the trial's whole curve."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, name
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("dlsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(trials) and len(runs) == len(trials) + 1
    by_run_id = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    for run in children:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        trial = by_run_id[run.info.run_id]
        assert run.data.tags["dlsearch.state"] == trial.state.name
        n_epochs = trial.user_attrs["epochs_run"]
        assert 1 <= n_epochs <= EPOCHS and n_epochs == len(trial.intermediate_values)
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, n_epochs + 1)), (run.info.run_name, key)
        val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert val == pytest.approx(trial.intermediate_values)


def test_eight_trials_at_once_keep_every_curve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_study(
        tmp_path, name="eight-at-once", budget={"trials": 8},
        resources={"cpus_per_trial": 0.25, "max_concurrent": 8},
    )
    spec = load_spec(path)
    summary = run_study(spec)
    assert summary.n_complete + summary.n_pruned + summary.n_failed == 8
    trials = finished_trials(spec.tracking.optuna_storage, spec.name)
    assert len(trials) == 8
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}, [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    check_mlflow_children(MlflowClient(tracking_uri=spec.tracking.uri), spec.name, trials)
    overlapping = [
        (a.number, b.number) for a, b in itertools.combinations(trials, 2)
        if a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    ]
    assert overlapping, [(t.number, t.datetime_start, t.datetime_complete) for t in trials]


def test_two_studies_on_one_store_at_once(tmp_path: Path) -> None:
    names = ("study-a", "study-b")
    paths = [write_study(tmp_path, f"{n}.yaml", name=n) for n in names]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dlsearch", "run", path.name],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for path in paths
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for name, proc, out in zip(names, procs, outputs):
        assert proc.returncode == 0, f"{name}:\n{out}"
        assert "database is locked" not in out and "Traceback" not in out, f"{name}:\n{out}"

    spec = load_spec(paths[0])
    storage = spec.tracking.optuna_storage
    assert set(optuna.get_all_study_names(storage)) == set(names)
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    assert {e.name for e in client.search_experiments()} >= set(names)
    for name in names:
        trials = finished_trials(storage, name)
        assert len(trials) == 5
        assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
        check_mlflow_children(client, name, trials)
        assert client.get_model_version_by_alias(name, "best").run_id in {
            t.user_attrs["mlflow_run_id"] for t in trials
        }
