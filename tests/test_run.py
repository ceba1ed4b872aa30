"""End to end: a small digits study through real Ray Tune, Optuna storage and MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.cli.commands import main
from dlsearch.tuner.runner import run_study
from dlsearch.config.spec import load_spec
from tests.studies import write_study

pytestmark = pytest.mark.slow

N_TRIALS = 8
EPOCHS = 6


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("e2e")
    path = write_study(folder, budget={"trials": N_TRIALS}, train={"epochs": EPOCHS})
    events: list[tuple[str, dict]] = []
    summary = run_study(load_spec(path), on_event=lambda kind, info: events.append((kind, dict(info))))
    return path, summary, events


def test_optuna_holds_every_trial_with_pruned_ones(finished_study) -> None:
    path, summary, _ = finished_study
    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    states = [t.state for t in study.trials]
    assert len(states) == N_TRIALS
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.PRUNED) >= 1
    assert states.count(TrialState.COMPLETE) >= 1
    assert summary.n_complete + summary.n_pruned + summary.n_failed == N_TRIALS
    for t in study.trials:
        assert t.user_attrs["mlflow_run_id"]
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        # define-by-run: momentum is sampled exactly when the optimizer is sgd
        assert ("train.momentum" in t.params) == (t.params["train.optimizer"] == "sgd")
    # pruning acted as early stopping: fewer epochs than trials x epochs
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    assert epochs < N_TRIALS * EPOCHS
    assert summary.best_value == max(t.value for t in study.trials if t.state == TrialState.COMPLETE)


def test_mlflow_has_one_parent_and_a_child_per_trial(finished_study) -> None:
    path, summary, _ = finished_study
    spec = load_spec(path)
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("dlsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.run_id == summary.parent_run_id
    assert len(children) == N_TRIALS
    assert {r.info.run_name for r in children} == {f"trial-{n}" for n in range(N_TRIALS)}
    study = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    by_number = {t.number: t for t in study.trials}
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        number = int(run.data.tags["dlsearch.trial_number"])
        trial = by_number[number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["dlsearch.state"] == trial.state.name
        assert run.info.status == "FINISHED"
        # the full resolved config as dotted params, sampled values included
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert run.data.params["model.depth"] == "1"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == sorted(trial.intermediate_values)
        for key in ("train_loss", "train_accuracy", "val_loss", "lr", "epoch_time_s"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(history)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
        if trial.state == TrialState.COMPLETE:
            assert "test_accuracy" in run.data.metrics
            assert "checkpoint" in artifacts
    parent_artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"study.yaml", "leaderboard.csv", "learning_curves.png", "optimization_history.png"} <= parent_artifacts
    best_curve = client.get_metric_history(summary.parent_run_id, "best_value")
    assert len(best_curve) >= 1 and max(m.value for m in best_curve) == pytest.approx(summary.best_value)
    version = client.get_model_version_by_alias(spec.name, "best")
    assert version.run_id == by_number[summary.best_number].user_attrs["mlflow_run_id"]


def test_progress_events_cover_every_trial(finished_study) -> None:
    _, _, events = finished_study
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("trial_start") == N_TRIALS == kinds.count("trial_end")


def test_report_and_best_commands(finished_study) -> None:
    path, summary, _ = finished_study
    runner = CliRunner()
    out = runner.invoke(main, ["report", str(path), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert len(report["trials"]) == N_TRIALS
    assert report["trials"][0]["number"] == summary.best_number
    assert {t["state"] for t in report["trials"]} >= {"COMPLETE", "PRUNED"}
    assert any(p.endswith("learning_curves.png") and Path(p).exists() for p in report["plots"])
    table = runner.invoke(main, ["report", str(path), "--top", "3"])
    assert table.exit_code == 0 and "PRUNED" in table.output or "COMPLETE" in table.output
    csv = runner.invoke(main, ["report", str(path), "--format", "csv"])
    assert csv.output.splitlines()[0].startswith("number,state,value")
    best = runner.invoke(main, ["best", str(path)])
    assert best.exit_code == 0, best.output
    config = yaml.safe_load(best.output)
    assert config["train"]["lr"] == pytest.approx(summary.best_params["train.lr"])
    as_json = json.loads(runner.invoke(main, ["best", str(path), "--json"]).output)
    assert as_json["trial"] == summary.best_number


def test_rerun_of_a_finished_study_runs_nothing_and_trials_extend_it(finished_study) -> None:
    path, _, _ = finished_study
    spec = load_spec(path)
    again = run_study(spec)
    assert again.n_complete + again.n_pruned + again.n_failed == N_TRIALS
    assert again.epochs_run == 0
    extended = run_study(spec, trials=N_TRIALS + 2)
    assert extended.n_complete + extended.n_pruned + extended.n_failed == N_TRIALS + 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], url: str, cwd: Path):
    """Start a server subprocess and wait (up to 90 s) until `url` answers; yields the process."""
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise AssertionError(f"{cmd} did not answer at {url}")


def test_mlflow_ui_serves_children_nested_under_the_parent(finished_study) -> None:
    import urllib.request

    path, summary, _ = finished_study
    port = _free_port()
    proc = _serve([sys.executable, "-m", "dlsearch", "ui", str(path), "--port", str(port)], f"http://127.0.0.1:{port}/health",
                  path.parent)
    try:
        spec = load_spec(path)
        experiment_id = MlflowClient(tracking_uri=spec.tracking.uri).get_experiment_by_name(spec.name).experiment_id
        body = json.dumps({"experiment_ids": [experiment_id], "max_results": 100}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.loads(response.read())["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        children = [t for t in tags if t.get("mlflow.parentRunId") == summary.parent_run_id]
        assert len(children) >= N_TRIALS  # the UI nests runs by this tag
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_optuna_dashboard_opens_the_study(finished_study) -> None:
    import urllib.request

    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the test extras")
    path, _, _ = finished_study
    spec = load_spec(path)
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    proc = _serve([str(dashboard), spec.tracking.optuna_storage, "--host", "127.0.0.1",
                   "--port", str(port)], f"http://127.0.0.1:{port}/api/studies", path.parent)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
            studies = json.loads(response.read())["study_summaries"]
        assert spec.name in {s["study_name"] for s in studies}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
