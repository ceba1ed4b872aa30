"""End to end: a small digits study through real Ray Tune, Optuna storage and MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
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
    study = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    by_number = {t.number: t for t in study.trials}
    # the name says the state and the objective (a pruned trial's best before it was stopped)
    assert sorted(r.info.run_name for r in children) == sorted(_shown_name(t) for t in study.trials)
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == summary.parent_run_id
        number = int(run.data.tags["dlsearch.trial_number"])
        trial = by_number[number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["dlsearch.state"] == trial.state.name
        assert run.info.status == "FINISHED"
        # summary metrics, one value each (step 0), not curves
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(_objective(trial))
        assert run.data.metrics["epochs_run"] == len(trial.intermediate_values)
        for key in ("best_val_accuracy", "epochs_run", "test_accuracy"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == (
                [0] if key in run.data.metrics else [])
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
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.params["search.train.lr"] == "loguniform(1e-05, 0.3)"
    assert parent.data.params["search.train.momentum"] == "uniform(0.5, 0.9) if train.optimizer = sgd"
    assert parent.data.params["search.model.width"] == "choice(16, 32, 64)"
    assert parent.data.params["sampler"] == "tpe(n_startup_trials=4)"
    assert parent.data.params["pruner"] == "median(n_startup_trials=2, n_warmup_steps=1)"
    assert parent.data.params["objective"] == "maximize val_accuracy"
    assert parent.data.params["budget.trials"] == str(N_TRIALS)
    assert parent.data.tags["best.trial"] == str(summary.best_number)
    assert {k.removeprefix("best."): v for k, v in parent.data.tags.items() if k.startswith("best.") and k != "best.trial"} == {
        k: str(v) for k, v in summary.best_params.items()}
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


# ------------------------------------------------------------ what a person sees, in a real browser
# Headless Chromium from Debian's package (.ci/run installs it), driven by Playwright (never
# `playwright install`: it runs the system's browser). The MLflow UI is a single-page app that
# renders after its bundle loads and its API answers: waits are for selectors, with generous
# timeouts (seconds on a loaded 2-core machine). DLSEARCH_SCREENSHOTS=docs also saves the pages
# as docs/mlflow_ui.png and docs/optuna_dashboard.png (the README shows them).

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip; the rest of the module runs
    expect = sync_playwright = None

_RENDER_MS = 120_000
_SCREEN = {"width": 1600, "height": 1000}


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is in the test extra (pip install -e '.[test]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's package as root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


def test_mlflow_ui_shows_each_trial_with_its_state_and_objective(finished_study, browser) -> None:
    path, _, _ = finished_study
    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "dlsearch", "ui", str(path), "--port", str(port)], cwd=path.parent,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = ui.stdout.readline()  # once the server answers
        assert printed.startswith("MLflow UI: "), printed
        link = printed.split()[2]
        assert "viewStateShareKey=dlsearch-trials" in link
        page = browser.new_page(viewport=_SCREEN)  # a fresh profile, as a first visit
        page.goto(link)
        # the experiment opens on its training runs (not the GenAI overview), in the trials view
        page.get_by_text(_shown_name(study.best_trial), exact=True).wait_for(timeout=_RENDER_MS)
        assert page.get_by_role("heading", name="Runs").is_visible()
        assert page.get_by_text("Detect Issues").count() == 0
        # every trial is a row; its name gives state and objective, and so do the view's columns
        rows = page.locator('.ag-row .ag-cell[col-id="attributes.`Run Name`"]')
        expect(rows).to_have_count(len(study.trials) + 1, timeout=_RENDER_MS)
        names = _column(page, "attributes.`Run Name`")
        assert sorted(names[:-1]) == sorted(_shown_name(t) for t in study.trials)
        assert names[0] == _shown_name(study.best_trial)  # ranked by the objective, best first
        assert names[-1] == study.study_name  # the parent has no objective: last
        states = _column(page, "tags.`dlsearch.state`")
        values = _column(page, "metrics.`best_val_accuracy`")
        by_name = {_shown_name(t): t for t in study.trials}
        for name, state, value in zip(names[:-1], states, values):
            trial = by_name[name]
            assert state == trial.state.name
            assert float(value.rstrip(".…")) == pytest.approx(_objective(trial), abs=1e-3)
        assert page.locator('.ag-header-cell[col-id="params.`train.lr`"]').is_visible()
        if os.environ.get("DLSEARCH_SCREENSHOTS"):
            _save(page, "mlflow_ui.png", close=("Close", "Hide banner"))  # MLflow's assistant panel, the view's banner
        page.close()

        # MLflow's own default view (no saved view): the parent row unfolds to one child per trial
        page = browser.new_page(viewport=_SCREEN)
        page.goto(link.split("&viewStateShareKey")[0])
        parent = page.locator(".ag-row", has_text=study.study_name)
        parent.wait_for(timeout=_RENDER_MS)
        rows = page.locator('.ag-row .ag-cell[col-id="attributes.`Run Name`"]')
        assert page.get_by_text("trial-0 · ").count() == 0  # folded
        parent.get_by_role("button").first.click()
        expect(rows).to_have_count(len(study.trials) + 1, timeout=_RENDER_MS)
        assert sorted(_column(page, "attributes.`Run Name`")) == sorted(
            [study.study_name] + [_shown_name(t) for t in study.trials])
        page.close()
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def test_optuna_dashboard_names_the_objective(finished_study, browser) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is in the test extras")
    path, _, _ = finished_study
    spec = load_spec(path)
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    proc = _serve([str(dashboard), spec.tracking.optuna_storage, "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/api/studies", path.parent)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as response:
            study_id = {s["study_name"]: s["study_id"] for s in json.loads(response.read())["study_summaries"]}[spec.name]
        page = browser.new_page(viewport=_SCREEN)
        page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        page.get_by_text("Best Trial").wait_for(timeout=_RENDER_MS)
        page.locator(".js-plotly-plot").first.wait_for(timeout=_RENDER_MS)
        # The history's y axis and its selector name the metric; the page fills them in as the
        # study's data arrives, so wait for a shown one (hidden copies, e.g. menu options, don't count).
        page.get_by_text("val_accuracy").filter(visible=True).first.wait_for(timeout=_RENDER_MS)
        assert page.get_by_text("Objective 0").count() == 0
        for state in ("Pruned", "Complete"):
            page.get_by_text(state).filter(visible=True).first.wait_for(timeout=_RENDER_MS)
        if os.environ.get("DLSEARCH_SCREENSHOTS"):
            _save(page, "optuna_dashboard.png")
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_rerun_of_a_finished_study_runs_nothing_and_trials_extend_it(finished_study) -> None:
    path, _, _ = finished_study
    spec = load_spec(path)
    again = run_study(spec)
    assert again.n_complete + again.n_pruned + again.n_failed == N_TRIALS
    assert again.epochs_run == 0
    extended = run_study(spec, trials=N_TRIALS + 2)
    assert extended.n_complete + extended.n_pruned + extended.n_failed == N_TRIALS + 2
    # the parent's params stay as the version started; its best-trial tags follow the study
    parent = MlflowClient(tracking_uri=spec.tracking.uri).get_run(extended.parent_run_id)
    assert parent.data.params["budget.trials"] == str(N_TRIALS)
    assert parent.data.tags["best.trial"] == str(extended.best_number)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], url: str, cwd: Path):
    """Start a server subprocess and wait (up to 90 s) until `url` answers; yields the process."""
    import time

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


def _objective(trial) -> float:
    """A trial's value; a pruned trial's best epoch before it was stopped (what MLflow shows of it)."""
    return trial.value if trial.state == TrialState.COMPLETE else max(trial.intermediate_values.values())


def _shown_name(trial) -> str:
    """The MLflow run name of a finished trial: its state and objective."""
    if trial.state == TrialState.COMPLETE:
        return f"trial-{trial.number} · complete · {trial.value:.4f}"
    assert trial.state == TrialState.PRUNED, trial.state
    return f"trial-{trial.number} · pruned @ epoch {len(trial.intermediate_values)} · {_objective(trial):.4f}"


def _column(page, col_id: str) -> list[str]:
    """The texts of a runs-table column, top to bottom (ag-grid renders rows out of order)."""
    cells = page.locator(f'.ag-row .ag-cell[col-id="{col_id}"]')
    rows = cells.evaluate_all(
        # the run-name cell also holds its colour picker's label: the last line is the text shown
        "cells => cells.map(c => [Number(c.closest('.ag-row').getAttribute('row-index')),"
        " c.innerText.trim().split('\\n').pop()])")
    return [text for _, text in sorted(rows)]


def _save(page, filename: str, close: tuple[str, ...] = ()) -> None:
    """The page as docs/<filename> (DLSEARCH_SCREENSHOTS names the folder), after closing `close` (buttons)."""
    for label in close:
        page.get_by_role("button", name=label).click()
    page.wait_for_timeout(1000)  # the layout settles after a panel closes (no element to wait for)
    folder = Path(__file__).resolve().parents[1] / os.environ["DLSEARCH_SCREENSHOTS"]
    page.screenshot(path=str(folder / filename))
