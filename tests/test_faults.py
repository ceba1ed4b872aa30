"""Trial faults end that trial, never the study: exceptions, NaN losses, killed workers."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from dlsearch.cli.commands import main
from dlsearch.cli.progress import StudyProgress
from dlsearch.tuner.runner import run_study
from dlsearch.config.spec import load_spec
from tests.test_run import write_study

pytestmark = pytest.mark.slow


def trials_of(study: Path) -> list[optuna.trial.FrozenTrial]:
    spec = load_spec(study)
    return optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage).trials


def child_runs(study: Path) -> dict[str, object]:
    spec = load_spec(study)
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId")}


def test_raising_and_nan_trials_fail_with_their_reason_and_the_study_goes_on(tmp_path: Path) -> None:
    # train.loss=bce only fails when the trial builds its model (one logit needs 2 classes; digits has 10);
    # sgd at lr 1e6 without clipping turns the loss into NaN in the first epoch.
    study = write_study(
        tmp_path,
        budget={"trials": 6},
        train={"epochs": 3, "batch_size": 64, "optimizer": "sgd", "grad_clip": 0.0},
        search={
            "train.loss": {"type": "categorical", "choices": ["auto", "bce"]},
            "train.lr": {"type": "categorical", "choices": [0.05, 1.0e30]},
        },
        sampler={"type": "grid"},
        pruner={"type": "none"},
    )
    result = CliRunner().invoke(main, ["run", str(study), "--trials", "4"])
    assert result.exit_code == 0, result.output  # some trials failed: the study is still done
    trials = trials_of(study)
    assert len(trials) == 4
    runs = child_runs(study)
    by_id = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        if t.params["train.loss"] == "bce":
            assert t.state == TrialState.FAIL
            assert "train.loss: bce (one logit) needs 2 classes (got 10)" in t.user_attrs["fail_reason"]
        elif t.params["train.lr"] == 1.0e30:
            assert t.state == TrialState.FAIL
            assert re.search(r"(train|val)_loss became (nan|inf) at epoch \d+", t.user_attrs["fail_reason"])
        else:
            assert t.state == TrialState.COMPLETE
        assert run.data.tags["dlsearch.state"] == t.state.name
        if t.state == TrialState.FAIL:
            assert run.info.status == "FAILED"
            assert run.data.tags["dlsearch.fail_reason"] == t.user_attrs["fail_reason"]
    assert set(by_id) == set(runs)
    report = CliRunner().invoke(main, ["report", str(study)])
    assert "the loss diverged" in report.output and "train.loss" in report.output


def test_every_trial_failing_exits_1_with_the_reasons(tmp_path: Path) -> None:
    study = write_study(
        tmp_path, budget={"trials": 2}, train={"epochs": 2, "optimizer": "sgd", "lr": 1.0e30, "grad_clip": 0.0},
        search={"model.width": {"type": "categorical", "choices": [16, 32]}}, pruner={"type": "none"},
    )
    result = CliRunner().invoke(main, ["run", str(study)])
    assert result.exit_code == 1, result.output
    assert "every trial failed" in result.output and "the loss diverged" in result.output
    assert "(x2)" in result.output


def _kill_a_worker_at_epoch(epoch_to_kill: int) -> tuple[list, callable]:
    """An on_event hook that SIGKILLs the trial's Ray worker process once it reported `epoch_to_kill`."""
    killed: list[int] = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "epoch" and info["epoch"] == epoch_to_kill and not killed:
            pids = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))

    return killed, on_event


def _shown_by_progress(on_event: callable) -> tuple[io.StringIO, callable]:
    """What `dlsearch run`'s progress prints (as in a log file), beside `on_event`."""
    shown = io.StringIO()
    progress = StudyProgress(Console(file=shown, width=400), "val_accuracy")

    def both(kind: str, info: dict) -> None:
        on_event(kind, info)
        progress(kind, info)

    return shown, both


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    study = write_study(
        tmp_path, budget={"trials": 1}, pruner={"type": "none"},
        train={"epochs": 8, "batch_size": 64, "checkpoint_every": 1, "early_stopping": {"patience": 8}},
        resources={"cpus_per_trial": 1, "max_concurrent": 1, "max_failures": 2},
    )
    killed, on_event = _kill_a_worker_at_epoch(3)
    shown, on_event = _shown_by_progress(on_event)
    summary = run_study(load_spec(study), on_event=on_event)
    assert killed, "a worker process was killed"
    # One line says it (the trial, what happened, which retry, from where); Ray's raylet notice and
    # ActorDiedError traceback stay in Ray's logs, off this process's console.
    said = re.search(r"trial 0: its worker process died at epoch (\d+); retry 1 of 2 from the checkpoint of "
                     r"epoch (\d+)", shown.getvalue())
    # The checkpoint Tune restores is its latest saved one: that of the epoch reported, or one before
    # when the worker died before Tune had taken the last (the driver logs the repeated epochs once).
    assert said and 1 <= int(said.group(2)) <= int(said.group(1)), shown.getvalue()
    console = "".join(capfd.readouterr())
    assert "Traceback" not in console and "ActorDiedError" not in console and "worker died" not in console, console
    assert summary.n_complete == 1
    (trial,) = trials_of(study)
    # resumed from the checkpoint of epoch 3: every epoch reported once, none lost
    assert sorted(trial.intermediate_values) == list(range(1, 9))
    run = next(iter(child_runs(study).values()))
    assert run.info.status == "FINISHED"
    spec = load_spec(study)
    history = MlflowClient(tracking_uri=spec.tracking.uri).get_metric_history(run.info.run_id, "val_loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))


def test_killed_worker_without_retries_fails_the_trial(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    study = write_study(
        tmp_path, budget={"trials": 1}, pruner={"type": "none"},
        train={"epochs": 8, "batch_size": 64, "early_stopping": {"patience": 8}},
        resources={"cpus_per_trial": 1, "max_concurrent": 1, "max_failures": 0},
    )
    killed, on_event = _kill_a_worker_at_epoch(2)
    summary = run_study(load_spec(study), on_event=on_event)
    assert killed
    assert summary.n_failed == 1 and summary.n_complete == 0
    console = "".join(capfd.readouterr())  # the trial's FAIL and its reason are the driver's to say
    assert "Traceback" not in console and "ActorDiedError" not in console and "did not complete" not in console
    (trial,) = trials_of(study)
    assert trial.state == TrialState.FAIL
    assert "worker failed" in trial.user_attrs["fail_reason"]
    run = next(iter(child_runs(study).values()))
    assert run.info.status == "FAILED" and "worker failed" in run.data.tags["dlsearch.fail_reason"]
