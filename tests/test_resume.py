"""Nothing lost: a driver killed at any moment (SIGKILL, SIGTERM) resumes to exactly its budget.

Real processes: `python -m dlsearch run` as a subprocess, killed, then rerun.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.config.spec import load_spec
from tests.test_run import write_study

pytestmark = pytest.mark.slow

BUDGET = 8


def start_run(study: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dlsearch", "run", str(study), *args],
        cwd=study.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a kill reaches the driver only, as in real life
    )


def kill_when_trials_run(proc: subprocess.Popen, study: Path, sig: int, extra_s: float) -> None:
    """Wait until a trial is RUNNING in Optuna, then `extra_s` more, then send `sig` to the driver."""
    spec = load_spec(study)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
            if any(t.state == TrialState.RUNNING for t in s.get_trials(deepcopy=False)):
                break
        except (KeyError, Exception):  # noqa: BLE001 - the storage may not exist yet
            pass
        time.sleep(0.5)
    time.sleep(extra_s)
    if proc.poll() is None:
        proc.send_signal(sig)


def assert_invariants(study: Path, budget: int) -> None:
    spec = load_spec(study)
    s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    trials = s.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING], "zero RUNNING trials in Optuna"
    finished = [t for t in trials if t.state.is_finished() and t.user_attrs.get("fail_reason") != "interrupted"]
    assert len(finished) == budget, "exactly the budget of finished trials"
    assert all(t.state != TrialState.FAIL for t in finished), [t.user_attrs for t in finished]
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("dlsearch.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "the parent is reused across resumes"
    assert not [r for r in children if r.info.status == "RUNNING"], "zero RUNNING child runs"
    numbers = [r.data.tags["dlsearch.trial_number"] for r in children if r.info.status == "FINISHED"]
    assert len(numbers) == len(set(numbers)), "no two FINISHED child runs for the same trial number"
    by_run = {r.info.run_id: r for r in children}
    for t in finished:
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["dlsearch.state"] == t.state.name
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == sorted(t.intermediate_values), f"trial {t.number}: the curve is complete"
    for t in trials:
        if t.user_attrs.get("fail_reason") == "interrupted":
            assert by_run[t.user_attrs["mlflow_run_id"]].info.status == "KILLED"


def test_sigkill_loop_then_finish(tmp_path: Path) -> None:
    study = write_study(tmp_path, budget={"trials": BUDGET},
                        train={"epochs": 20, "batch_size": 64, "early_stopping": {"patience": 20}},
                        resources={"cpus_per_trial": 1, "max_concurrent": 2})
    rng = random.Random(7)
    for _ in range(3):
        proc = start_run(study)
        kill_when_trials_run(proc, study, signal.SIGKILL, extra_s=rng.uniform(0.5, 6.0))
        proc.wait(timeout=60)
    final = start_run(study)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out
    assert "Traceback" not in out
    assert_invariants(study, BUDGET)


def test_sigterm_saves_state_exits_130_and_resumes(tmp_path: Path) -> None:
    study = write_study(tmp_path, budget={"trials": 4},
                        train={"epochs": 40, "batch_size": 64, "early_stopping": {"patience": 40}},
                        pruner={"type": "none"}, resources={"cpus_per_trial": 1, "max_concurrent": 2})
    proc = start_run(study)
    kill_when_trials_run(proc, study, signal.SIGTERM, extra_s=1.0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "rerun the same command to continue" in out and "Traceback" not in out
    spec = load_spec(study)
    s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    interrupted = [t for t in s.trials if t.user_attrs.get("fail_reason") == "interrupted"]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    assert not [t for t in s.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    parent = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id],
                                filter_string="tags.`dlsearch.role` = 'parent'")[0]
    assert parent.info.status == "KILLED"
    # The rerun says it resumes, runs the interrupted configurations again, and reaches the budget.
    again = start_run(study)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resuming" in out and "will run again" in out
    assert_invariants(study, 4)
    s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    reruns = [t for t in s.trials if "rerun_of" in t.user_attrs]
    assert {t.user_attrs["rerun_of"] for t in reruns} == {t.number for t in interrupted}
    for t in reruns:
        assert t.params == s.trials[t.user_attrs["rerun_of"]].params


def test_fresh_starts_a_new_version(tmp_path: Path) -> None:
    study = write_study(tmp_path, budget={"trials": 1}, train={"epochs": 1},
                        resources={"cpus_per_trial": 1, "max_concurrent": 1})
    first = subprocess.run([sys.executable, "-m", "dlsearch", "run", str(study)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run([sys.executable, "-m", "dlsearch", "run", str(study), "--fresh"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fresh version of the study: e2e-digits-v2" in second.stdout
    spec = load_spec(study)
    names = optuna.get_all_study_names(spec.tracking.optuna_storage)
    assert sorted(names) == ["e2e-digits", "e2e-digits-v2"]
    assert os.path.exists(tmp_path / "optuna.db")
