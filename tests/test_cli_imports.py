"""What the commands that run no trial import, and what `report` reads instead of computing.

`validate`, `report`, `best` and `studies` never import torch, Ray or MLflow (seconds each on a small
machine), and `report` reads the importances a finished run logged instead of importing
scikit-learn (through Optuna's importance module) to compute them again. Each command runs
in a fresh interpreter: this test process may have imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution, FloatDistribution

from dlsearch.cli.commands import main
from dlsearch.config.spec import load_spec
from dlsearch.config.stores import tracking_uri
from dlsearch.report.leaderboard import ARTIFACT_URI_ATTR, importances, write_study_artifacts
from dlsearch.tracking.tracker import MlflowTracker
from tests.studies import write_study

REPO = Path(__file__).resolve().parents[1]
NEVER = ("torch", "ray", "mlflow")  # what a command that runs no trial must not import
SLOW_TO_IMPORT = ("matplotlib", "sklearn", "pandas")  # what `report` and `best` need only to write or recompute
_INVOKE = """
import json, sys
from click.testing import CliRunner
from dlsearch.cli.commands import main
result = CliRunner().invoke(main, {args!r})
loaded = sorted(m for m in {modules!r} if m in sys.modules)
print(json.dumps({{"exit_code": result.exit_code, "stdout": result.stdout, "output": result.output, "loaded": loaded}}))
"""


def invoke_fresh(args: list[str], cwd: Path) -> dict:
    """Run `dlsearch ARGS` in a new interpreter: its exit code, stdout, all output, and the heavy modules it loaded."""
    code = _INVOKE.format(args=args, modules=NEVER + SLOW_TO_IMPORT)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_and_the_report_loads_no_heavy_library() -> None:
    code = ("import dlsearch.cli.commands, dlsearch.report.leaderboard, dlsearch.config.spec; import sys; "
            f"print(sorted(m for m in {NEVER + SLOW_TO_IMPORT!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("changes", [[], ["--set", "data.dataset=mnist", "--set", "data.download=false",
                                           "--set", "data.root=/nonexistent"]])
def test_validate_imports_no_heavy_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: list[str]) -> None:
    # The second case looks for MNIST files (and finds none): the data check runs without torch too.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DLSEARCH_DATA_DIR", raising=False)
    result = invoke_fresh(["validate", str(write_study(tmp_path)), *changes], tmp_path)
    assert result["exit_code"] == (2 if changes else 0), result["output"]
    assert ("data.root: MNIST files not found" in result["output"]) if changes else result["stdout"].startswith("ok:")
    assert result["loaded"] == [], result["loaded"]


DISTRIBUTIONS = {"train.lr": FloatDistribution(1e-5, 0.3, log=True),
                 "train.optimizer": CategoricalDistribution(["adam", "sgd"]),
                 "model.width": CategoricalDistribution([16, 32, 64])}


def _trial(lr: float, width: int, value: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"train.lr": lr, "train.optimizer": "adam", "model.width": width}, distributions=DISTRIBUTIONS,
        value=value, intermediate_values={1: value - 0.1, 2: value},
        user_attrs={"epochs_run": 2, "test_accuracy": value},
    )


def _finished_study(folder: Path) -> tuple[Path, optuna.Study, Path]:
    """A study as a finished run leaves it, without running one: trials in Optuna, and a parent run in
    MLflow holding the leaderboard, importances and plots. Returns the study file, the study and the
    parent run's artifact folder."""
    path = write_study(folder)
    spec = load_spec(path)
    study = optuna.create_study(storage=tracking_uri(spec.tracking.optuna_storage), study_name=spec.name,
                                direction="maximize")
    for lr, width, value in [(1e-3, 16, 0.80), (3e-3, 32, 0.90), (1e-2, 64, 0.95), (1e-4, 16, 0.60),
                             (3e-2, 32, 0.85), (2e-4, 64, 0.70)]:
        study.add_trial(_trial(lr, width, value))
    tracker = MlflowTracker(spec, spec.name)
    tracker.open()
    study.set_user_attr(ARTIFACT_URI_ATTR, tracker.artifact_uri)  # as the driver records it
    write_study_artifacts(spec, study, folder / "out")
    tracker.finish_study(folder / "out")
    logged = Path(tracker.client.get_run(tracker.parent_run_id).info.artifact_uri.removeprefix("file://"))
    return path, study, logged


def test_report_and_best_read_a_finished_study_without_torch_ray_mlflow_or_sklearn(tmp_path: Path) -> None:
    path, study, logged = _finished_study(tmp_path)
    report = invoke_fresh(["report", str(path), "--json"], tmp_path)
    assert report["exit_code"] == 0, report["output"]
    assert report["loaded"] == [], report["loaded"]
    found = json.loads(report["stdout"])
    assert [t["number"] for t in found["trials"]][:2] == [2, 1]  # best first
    assert found["importances"] == json.loads((logged / "importances.json").read_text()) != {}
    assert {Path(p).name for p in found["plots"]} >= {"learning_curves.png", "optimization_history.png"}
    assert all(Path(p).parent == logged and Path(p).exists() for p in found["plots"])
    best = invoke_fresh(["best", str(path), "--json"], tmp_path)
    assert best["exit_code"] == 0, best["output"]
    assert best["loaded"] == [], best["loaded"]
    assert json.loads(best["stdout"])["trial"] == 2
    as_file = invoke_fresh(["best", str(path)], tmp_path)
    assert as_file["exit_code"] == 0, as_file["output"]
    assert as_file["loaded"] == [], as_file["loaded"]
    assert "name: e2e-digits-trial-2" in as_file["stdout"]


def test_studies_lists_the_store_without_torch_ray_mlflow_or_sklearn(tmp_path: Path) -> None:
    path, _, _ = _finished_study(tmp_path)
    for args in (["studies", str(path)], ["studies", str(path), "--json"]):
        found = invoke_fresh(args, tmp_path)
        assert found["exit_code"] == 0, found["output"]
        assert found["loaded"] == [], found["loaded"]
    assert json.loads(found["stdout"])[0]["n_trials"] == {"COMPLETE": 6}


def test_report_computes_importances_again_once_the_study_changed(tmp_path: Path) -> None:
    path, study, logged = _finished_study(tmp_path)
    (logged / "importances.json").write_text(json.dumps({"train.lr": 0.25, "model.width": 0.75}))
    as_logged = json.loads(CliRunner().invoke(main, ["report", str(path), "--json"]).stdout)["importances"]
    assert as_logged == {"train.lr": 0.25, "model.width": 0.75}  # the study has not changed: read back
    study.add_trial(_trial(1e-5, 64, 0.5))
    computed = json.loads(CliRunner().invoke(main, ["report", str(path), "--json"]).stdout)["importances"]
    assert computed == pytest.approx(importances(study)) and computed != as_logged
