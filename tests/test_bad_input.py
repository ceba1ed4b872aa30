"""Bad input through the real CLI: exit 2 (or 1 for a service that does not answer), one line
naming the path, no traceback, and nothing written. Plus the security promises of SPEC.

Every store lives inside the test's tmp_path, which is also the working directory, so a
recursive listing of it before and after shows anything a failed command left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from dlsearch.cli.commands import main
from dlsearch.tuner.preflight import study_lock
from dlsearch.config.spec import load_spec
from tests import studies

# A port nothing listens on: connections are refused at once (no timeout to wait for).
CLOSED = "127.0.0.1:9"
SECRET = "s3cr3t-d1sc4rd"


def write_study(folder: Path, filename: str = "study.yaml", **changes: Any) -> Path:
    """A one-trial, one-epoch digits study (no download) whose stores all live in `folder`."""
    base = {"name": "bad-input", "seed": 1, "train": {"epochs": 1, "batch_size": 64}, "budget": {"trials": 1}}
    return studies.write_study(folder, filename, **{**base, **changes})


def listing(root: Path) -> list[str]:
    """Every file and folder under `root`, as sorted relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_clean_failure(result: Result, code: int, prefix: str, rule: str = "") -> None:
    """Exit `code`, a line of its own starting with `prefix` (and naming `rule`), no traceback."""
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    # A clean failure is a SystemExit from the error handler, never an escaped exception.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in out.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starts with {prefix!r}:\n{out}"
    assert any(rule in line for line in lines), f"no {prefix!r} line says {rule!r}:\n{out}"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, with data lookups kept out of the user's folders."""
    monkeypatch.chdir(tmp_path)
    for var in ("DLSEARCH_DATA_DIR", "XDG_CACHE_HOME"):
        empty = tmp_path / f"empty-{var.lower()}"
        empty.mkdir()
        monkeypatch.setenv(var, str(empty))
    return tmp_path


# ---------------------------------------------------------------- malformed study files


def _yaml_syntax_error(folder: Path) -> tuple[Path, list[str], str, str]:
    path = write_study(folder)
    lines = path.read_text().splitlines()
    lines.insert(2, "seed: 1: 2")  # line 3: a plain scalar cannot hold `: `
    path.write_text("\n".join(lines) + "\n")
    return path, [], f"{path}:3:", "YAML syntax error"


def _mnist_not_found(folder: Path) -> tuple[Path, list[str], str, str]:
    root = folder / "empty-root"
    root.mkdir()
    data = {"dataset": "mnist", "download": False, "root": str(root), "val_fraction": 0.1}
    return write_study(folder, data=data), [], "data.root:", "not found"


CASES = {
    "yaml syntax error": _yaml_syntax_error,
    "wrong type": lambda f: (write_study(f, train={"epochs": "ten"}), [], "train.epochs:", "must be an integer"),
    "unknown key": lambda f: (write_study(f, train={"epoch": 3}), [], "train.epoch:", "unknown key"),
    "impossible range": lambda f: (
        write_study(f, search={"train.lr": {"type": "float", "low": 0.1, "high": 0.001}}),
        [], "search.train.lr:", "`low <= high` must hold",
    ),
    "unknown enum name": lambda f: (
        write_study(f, model={"activation": "relux"}), [], "model.activation:", "must be one of",
    ),
    "objective never reported": lambda f: (
        write_study(f, objective={"metric": "val_acc", "direction": "maximize"}),
        [], "objective.metric:", "never reports 'val_acc'",
    ),
    "csv file missing": lambda f: (
        write_study(f, data={"dataset": "csv", "path": "nope.csv", "val_fraction": 0.2}),
        [], "data.path:", "no such file",
    ),
    "mnist not found, no download": _mnist_not_found,
    "population of cnns": lambda f: (
        write_study(f, model={"kind": "cnn"}, resources={"population": 4}),
        [], "resources.population:", "populations stack mlp models (model.kind is cnn)",
    ),
    "--set without =": lambda f: (write_study(f), ["--set", "train.epochs"], "--set train.epochs:", "PATH=VALUE"),
    "--set of an unknown key": lambda f: (write_study(f), ["--set", "train.epoch=3"], "train.epoch:", "unknown key"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_study_exits_2_naming_the_path_and_writes_nothing(folder: Path, case: str) -> None:
    study, extra, prefix, rule = CASES[case](folder)
    before = listing(folder)
    result = invoke("run", str(study), *extra)
    assert_clean_failure(result, 2, prefix, rule)
    assert listing(folder) == before  # no mlflow.db, optuna.db, artifacts, ray, .locks


def test_bad_study_in_a_real_process_has_no_traceback(folder: Path) -> None:
    study = write_study(folder, "bad.yaml", train={"epochs": -1})
    before = listing(folder)
    proc = subprocess.run(
        [sys.executable, "-m", "dlsearch", "run", "bad.yaml"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert any(line.startswith("train.epochs: must be > 0") for line in proc.stderr.splitlines()), proc.stderr
    assert study.exists() and listing(folder) == before


# ---------------------------------------------------------------- stores and services


def test_unreachable_tracking_server_exits_1_and_writes_nothing(folder: Path) -> None:
    study = write_study(folder, tracking={"uri": f"http://{CLOSED}"})
    before = listing(folder)
    assert_clean_failure(invoke("run", str(study)), 1, "tracking.uri:", "cannot reach")
    assert listing(folder) == before


def test_unreachable_ray_address_exits_1_and_writes_nothing(folder: Path) -> None:
    study = write_study(folder)
    before = listing(folder)
    assert_clean_failure(invoke("run", str(study), "--address", CLOSED), 1, "resources.address:", "cannot reach")
    assert listing(folder) == before


def test_store_under_a_regular_file_exits_2(folder: Path) -> None:
    # A folder that cannot be created. (Permission bits would not do: the tests run as root,
    # and root writes into a chmod 0o500 folder anyway.)
    (folder / "afile").write_text("not a folder")
    study = write_study(folder, tracking={"artifacts": str(folder / "afile" / "artifacts")})
    before = listing(folder)
    assert_clean_failure(invoke("run", str(study)), 2, "tracking.artifacts:", "is not a folder")
    assert listing(folder) == before


def test_a_second_run_of_a_locked_study_exits_1(folder: Path) -> None:
    study = write_study(folder)
    with study_lock(load_spec(study)):
        before = listing(folder)
        result = invoke("run", str(study))
    assert_clean_failure(result, 1, "bad-input: another dlsearch run of this study is running")
    assert listing(folder) == before


# ---------------------------------------------------------------- security


def test_yaml_object_tags_are_rejected_and_never_run(folder: Path) -> None:
    marker = folder / "pwned"
    study = folder / "evil.yaml"
    study.write_text(
        f"name: !!python/object/apply:os.system ['touch {marker}']\n"
        "data: {dataset: digits}\n"
        "search: {train.lr: {type: float, low: 0.001, high: 0.1}}\n"
        "objective: {metric: val_accuracy, direction: maximize}\n"
    )
    before = listing(folder)
    assert_clean_failure(invoke("run", str(study)), 2, f"{study}:1:", "python/object/apply")
    assert not marker.exists()
    assert listing(folder) == before


def test_a_name_the_model_registry_refuses_exits_2_before_anything_runs(folder: Path) -> None:
    study = write_study(folder, name="../../escape")
    before = listing(folder)
    assert_clean_failure(invoke("run", str(study)), 2, "name:", "register_best: false")
    assert listing(folder) == before


@pytest.fixture(scope="module")
def escaped_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run of a study named `../../escape`, with a secret in the environment."""
    folder = tmp_path_factory.mktemp("sec")
    base = folder.parent  # where `<store>/../../escape` would land: outside `folder`
    study = write_study(
        folder, name="../../escape", budget={"trials": 1}, train={"epochs": 1},
        resources={"cpus_per_trial": 1, "max_concurrent": 1},
        # The Model Registry refuses a name with '/' (see the test below); everything else takes it.
        tracking={"register_best": False},
    )
    before = set(listing(base))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = invoke("run", str(study), env={"DLSEARCH_SECRET": SECRET})
    finally:
        os.chdir(cwd)
    return {"folder": folder, "base": base, "before": before, "result": result, "spec": load_spec(study)}


def test_a_study_name_cannot_escape_the_store_folders(escaped_run: dict[str, Any]) -> None:
    folder, base, result = escaped_run["folder"], escaped_run["base"], escaped_run["result"]
    assert result.exit_code == 0, result.output
    created = set(listing(base)) - escaped_run["before"]
    outside = sorted(p for p in created if not (base / p).is_relative_to(folder))
    assert outside == []
    for root in (base.parent, base.parent.parent):  # two levels further up
        assert not [p for p in root.iterdir() if p.name.startswith("escape")]
    # Every file the run made is in a store folder, each named by the slug ("escape"), not the name.
    spec = escaped_run["spec"]
    assert spec.slug == "escape"
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    experiment = client.get_experiment_by_name("../../escape")
    assert experiment is not None
    artifacts = (folder / "artifacts").resolve()
    assert Path(experiment.artifact_location.removeprefix("file://")).resolve().is_relative_to(artifacts)
    for run in client.search_runs([experiment.experiment_id]):
        assert Path(run.info.artifact_uri.removeprefix("file://")).resolve().is_relative_to(artifacts)
    ray_runs = list((folder / "ray").iterdir())
    assert ray_runs and all(p.name.startswith("escape-") for p in ray_runs)
    # the study's lock, and those that serialize creating each SQLite store
    assert {p.name for p in (folder / ".locks").iterdir()} == {"escape.lock", "mlflow.db.lock", "optuna.db.lock"}


def test_environment_values_never_become_params(escaped_run: dict[str, Any]) -> None:
    assert escaped_run["result"].exit_code == 0, escaped_run["result"].output
    spec = escaped_run["spec"]
    client = MlflowClient(tracking_uri=spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the parent and trial-0
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert children and "train.lr" in children[0].data.params  # params were logged, so the check means something
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert SECRET not in key and SECRET not in value, key
            assert "DLSEARCH_SECRET" not in key, key


def test_ui_binds_loopback_by_default() -> None:
    result = invoke("ui", "--help")
    assert result.exit_code == 0, result.output
    assert "127.0.0.1" in result.output
