"""A trainable as simple as in Optuna: plain search keys (`config["x"]`), no data or model section, a
loop that reports from epoch 0; pruned and tracked like any other study, through the real `dlsearch run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
from click.testing import CliRunner
from mlflow import MlflowClient

from dlsearch.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]

FIT = """\
def fit(config, report):
    x, y = config["x"], config["y"]
    for epoch in range(8):  # from 0, as most loops are written
        report(epoch, {"loss": (x - 1.5) ** 2 + (y + 0.5) ** 2 + 1.0 / (epoch + 1)})
"""

STUDY = """\
name: plain-keys
trainable: fit:fit
search:
  x: {type: float, low: -3.0, high: 3.0}
  y: {type: float, low: -3.0, high: 3.0}
objective: {metric: loss, direction: minimize}
sampler: {type: random}
pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 0}
budget: {trials: 10}
resources: {max_concurrent: 1}
tracking:
  uri: sqlite:///mlflow.db
  artifacts: artifacts
  optuna_storage: sqlite:///optuna.db
  register_best: false
"""


def test_a_trainable_over_plain_keys_reporting_from_epoch_0_runs_pruned_and_tracked(tmp_path: Path) -> None:
    (tmp_path / "fit.py").write_text(FIT)
    (tmp_path / "study.yaml").write_text(STUDY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "dlsearch", "run", "study.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    study = optuna.load_study(study_name="plain-keys", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert len(trials) == 10 and set(states) <= {"COMPLETE", "PRUNED"} and "PRUNED" in states, states
    for t in trials:
        assert set(t.params) == {"x", "y"}
        steps = sorted(t.intermediate_values)
        assert steps[0] == 0 and steps == list(range(len(steps)))  # Optuna's steps are the epochs as reported
        if t.state.name == "COMPLETE":
            assert len(steps) == 8 and t.user_attrs["epochs_run"] == 8
            assert t.value == min(t.intermediate_values.values())  # its best epoch's
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("plain-keys")
    children = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 10
    by_number = {t.number: t for t in trials}
    for run in children:
        trial = by_number[int(run.data.tags["dlsearch.trial_number"])]
        assert run.data.tags["dlsearch.state"] == trial.state.name
        assert float(run.data.params["x"]) == trial.params["x"] and float(run.data.params["y"]) == trial.params["y"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(trial.intermediate_values)  # MLflow's steps are Optuna's


BROKEN = """\
def fit(config, report):
    report(0, {"loss": 1.0})
    report(0, {"loss": 0.5})  # the same epoch twice
"""


def test_a_broken_report_contract_is_one_line_in_train(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_fit.py").write_text(BROKEN)
    (tmp_path / "study.yaml").write_text(STUDY.replace("fit:fit", "broken_fit:fit"))
    result = CliRunner().invoke(main, ["train", "study.yaml"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "report: epoch must be an integer, greater than the last one (0) (got 0)" in result.output


def test_train_gives_a_plain_key_the_middle_of_its_range(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seen_fit.py").write_text(textwrap.dedent("""\
        def fit(config, report):
            report(1, {"loss": config["x"] + config["y"]})
            return {"x": config["x"], "y": config["y"]}
    """))
    study = STUDY.replace("fit:fit", "seen_fit:fit").replace("y: {type: float, low: -3.0, high: 3.0}",
                                                             "y: {type: float, low: 0.01, high: 100.0, log: true}")
    (tmp_path / "study.yaml").write_text(study)
    result = CliRunner().invoke(main, ["train", "study.yaml", "--json"])
    assert result.exit_code == 0, result.output
    import json

    final = json.loads(result.stdout)["final_metrics"]
    assert final["x"] == 0.0 and abs(final["y"] - 1.0) < 1e-9  # the geometric middle on a log scale
