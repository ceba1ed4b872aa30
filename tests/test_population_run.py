"""`resources.population` end to end: trials that share their shapes train as one stacked model
in one Tune trial, and each stays its own Optuna trial and MLflow child run, pruned on its own.

A small digits study through real Ray Tune, Optuna storage and MLflow; the wide learning-rate
range makes some members worse than the median, so the pruner stops them mid-population.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.trial.population import VARYING
from dlsearch.tuner.runner import run_study
from dlsearch.config.spec import load_spec
from tests.studies import write_study

pytestmark = pytest.mark.slow

N_TRIALS, K, EPOCHS = 12, 4, 5


@pytest.fixture(scope="module")
def population_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study, list[tuple[str, dict]]]:
    folder = tmp_path_factory.mktemp("population")
    path = write_study(folder, budget={"trials": N_TRIALS}, train={"epochs": EPOCHS},
                       resources={"population": K, "max_concurrent": 1})
    events: list[tuple[str, dict]] = []
    run_study(load_spec(path), on_event=lambda kind, info: events.append((kind, dict(info))))
    study = optuna.load_study(study_name="e2e-digits", storage=f"sqlite:///{folder}/optuna.db")
    return folder, study, events


def test_members_share_their_shapes_and_each_is_its_own_optuna_trial(population_study) -> None:
    _, study, _ = population_study
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == N_TRIALS and all(t.state.is_finished() for t in trials)
    populations = {tuple(t.user_attrs["population"]) for t in trials if "population" in t.user_attrs}
    assert populations, "no trials trained as a population"
    assert max(len(p) for p in populations) > 1 and all(len(p) <= K for p in populations)
    by_number = {t.number: t for t in trials}
    for members in populations:
        shared = [{k: v for k, v in by_number[n].params.items() if k not in VARYING} for n in members]
        assert all(s == shared[0] for s in shared), shared  # width and the like: one stacked model
        families = {by_number[n].params["train.optimizer"] for n in members}
        assert len(families) == 1  # adam and sgd keep different optimizer state: never one population


def test_pruning_acts_on_each_member(population_study) -> None:
    _, study, _ = population_study
    members = [t for t in study.get_trials(deepcopy=False) if len(t.user_attrs.get("population", [])) > 1]
    pruned = [t for t in members if t.state == TrialState.PRUNED]
    complete = [t for t in members if t.state == TrialState.COMPLETE]
    assert pruned and complete, [(t.number, t.state.name) for t in members]
    for t in pruned:  # it trained no further than the epoch it was pruned at, unlike its neighbours
        assert t.user_attrs["epochs_run"] == max(t.intermediate_values) < EPOCHS
    assert any(t.user_attrs["epochs_run"] == EPOCHS for t in complete)


def test_each_member_has_a_child_run_with_its_curve_and_checkpoint(population_study) -> None:
    folder, study, _ = population_study
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e-digits").experiment_id],
                              "tags.`dlsearch.trial_number` != ''")
    by_number = {int(r.data.tags["dlsearch.trial_number"]): r for r in runs}
    assert sorted(by_number) == list(range(N_TRIALS))
    for t in study.get_trials(deepcopy=False):
        run = by_number[t.number]
        assert run.data.tags["dlsearch.state"] == t.state.name
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(curve) == t.user_attrs["epochs_run"]
        members = t.user_attrs.get("population")
        assert run.data.tags.get("dlsearch.population") == (",".join(map(str, members)) if members else None)
        if t.state == TrialState.COMPLETE:
            assert max(p.value for p in curve) == pytest.approx(t.value)
            files = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")]
            assert files == ["checkpoint/best.pt"]
            assert run.data.metrics["test_accuracy"] == pytest.approx(t.user_attrs["test_accuracy"])


def test_a_members_checkpoint_holds_its_own_best_weights(population_study) -> None:
    """The registered best trial's weights are its own row of the stacked model: evaluated alone,
    they give the validation accuracy its curve reached."""
    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.data import load_data
    from dlsearch.trial.models import build_model
    from dlsearch.trial.train import evaluate

    folder, study, _ = population_study
    best = study.best_trial
    if len(best.user_attrs.get("population", [])) < 2:
        best = max((t for t in study.trials if t.state == TrialState.COMPLETE and len(t.user_attrs.get("population", [])) > 1),
                   key=lambda t: t.value)
    spec = load_spec(folder / "study.yaml")
    cfg = trial_config(spec, best.params, best.number)
    data = load_data(cfg.data, cfg.data_seed)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    model.load_state_dict(torch.load(best.user_attrs["checkpoint"], map_location="cpu"))
    _, accuracy = evaluate(model, data.x_val, data.y_val)
    assert accuracy == pytest.approx(best.value, abs=1e-6)


def test_progress_names_every_member(population_study) -> None:
    _, _, events = population_study
    started = [info["number"] for kind, info in events if kind == "trial_start"]
    ended = [info["number"] for kind, info in events if kind == "trial_end"]
    assert sorted(started) == sorted(ended) == list(range(N_TRIALS))
