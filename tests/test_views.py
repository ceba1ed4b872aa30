"""What MLflow's UI is given of a study: the parent's params and the saved view of its trials (no MLflow)."""

from __future__ import annotations

import json

import pytest

from dlsearch.config.schema import CategoricalDim, FloatDim, IntDim
from dlsearch.config.spec import load_spec
from dlsearch.tracking.views import describe_dim, study_params, trials_view
from tests.studies import write_study


@pytest.mark.parametrize(("dim", "text"), [
    (FloatDim(type="float", low=1e-5, high=0.3, log=True), "loguniform(1e-05, 0.3)"),
    (FloatDim(type="float", low=0.0, high=0.5, step=0.1), "uniform(0, 0.5, step=0.1)"),
    (IntDim(type="int", low=16, high=256, log=True), "int(16, 256, log)"),
    (IntDim(type="int", low=1, high=9, step=2), "int(1, 9, step=2)"),
    (CategoricalDim(type="categorical", choices=["adam", "sgd"]), "choice(adam, sgd)"),
    (FloatDim(type="float", low=0.5, high=0.9, when={"train.optimizer": "sgd"}),
     "uniform(0.5, 0.9) if train.optimizer = sgd"),
    (FloatDim(type="float", low=0.5, high=0.9, when={"train.optimizer": ["sgd", "rmsprop"], "model.depth": 2}),
     "uniform(0.5, 0.9) if train.optimizer in (sgd, rmsprop) and model.depth = 2"),
])
def test_each_search_dimension_reads_as_written(dim, text) -> None:
    assert describe_dim(dim) == text


def test_parent_params_name_every_searched_key_and_the_search(tmp_path) -> None:
    spec = load_spec(write_study(tmp_path))
    params = study_params(spec)
    assert {k for k in params if k.startswith("search.")} == {f"search.{k}" for k in spec.search}
    assert params["sampler"] == "tpe(n_startup_trials=4)"
    assert params["pruner"] == "median(n_startup_trials=2, n_warmup_steps=1)"
    assert params["objective"] == "maximize val_accuracy" and params["budget.trials"] == "8"
    assert all(len(v) <= 6000 for v in params.values())  # MLflow's limit on a param value


def test_the_view_ranks_one_versions_trials_by_the_objective(tmp_path) -> None:
    spec = load_spec(write_study(tmp_path, objective={"metric": "val_loss", "direction": "minimize"}))
    envelope = json.loads(trials_view(spec, "e2e-digits-v2"))
    assert envelope["name"] == "dlsearch: trials of e2e-digits-v2" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "tags.`dlsearch.version` = 'e2e-digits-v2'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_val_loss`", True)  # lowest loss first
    assert state["selectedColumns"][:2] == ["tags.`dlsearch.state`", "metrics.`best_val_loss`"]
    assert {f"params.`{k}`" for k in spec.search} <= set(state["selectedColumns"])
