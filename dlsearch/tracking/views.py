"""What MLflow's UI shows of a study: the parent run's params and a saved view of the runs table.

MLflow's runs table shows, by default, run names with their creation time, dataset, duration,
source and models: no metric, no param, and the children folded under their parent. MLflow (3.15+)
keeps named views of that table as experiment tags (`mlflow.sharedViewState.<id>`, the view's
state as JSON) and opens one from a link (`?viewStateShareKey=<id>`); `dlsearch ui` prints that
link. The view lists the trials of one study version ranked by their objective, with each trial's
state, summary metrics and searched params as columns. (Sorted by anything but the creation time,
MLflow lists children flat, not under their parent; a view cannot unfold a parent either.)
"""

from __future__ import annotations

import json
import time
from typing import Any

from dlsearch.config.schema import CategoricalDim, FloatDim, IntDim, ObjectiveSpec, StudySpec

TRIALS_VIEW_ID = "dlsearch-trials"
TRIALS_VIEW_TAG = f"mlflow.sharedViewState.{TRIALS_VIEW_ID}"
# MLflow's query parameters: which of its two UIs (GenAI or model training) and which saved view.
# `mlflow.experimentKind` alone does not choose: MLflow 3.17 opens the UI a browser last used, GenAI at first.
TRAINING_UI = "workflowType=machine_learning"
_RUN_NAME = "attributes.`Run Name`"  # the runs table's id of its run-name column


def summary_metric(objective: ObjectiveSpec) -> str:
    """A trial's objective at its best epoch (for a pruned trial: the best it reached before)."""
    return f"best_{objective.metric}"


def study_params(spec: StudySpec) -> dict[str, str]:
    """The parent run's params: the search space (`search.<key>`), objective, sampler, pruner, budget."""
    params = {f"search.{key}": describe_dim(dim) for key, dim in spec.search.items()}
    params["objective"] = ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)
    params["sampler"] = _call(spec.sampler.model_dump())
    params["pruner"] = _call(spec.pruner.model_dump())
    params["budget.trials"] = str(spec.budget.trials)
    if spec.budget.timeout_s is not None:
        params["budget.timeout_s"] = f"{spec.budget.timeout_s:g}"
    return params


def describe_dim(dim: Any) -> str:
    """One search dimension as a person reads it: `loguniform(1e-05, 0.3)`, `choice(adam, sgd) if ...`."""
    if isinstance(dim, CategoricalDim):
        text = f"choice({', '.join(map(str, dim.choices))})"
    elif isinstance(dim, FloatDim):
        extra = f", step={dim.step:g}" if dim.step is not None else ""
        text = f"{'loguniform' if dim.log else 'uniform'}({dim.low:g}, {dim.high:g}{extra})"
    elif isinstance(dim, IntDim):
        extra = ", log" if dim.log else (f", step={dim.step}" if dim.step != 1 else "")
        text = f"int({dim.low}, {dim.high}{extra})"
    else:
        raise TypeError(f"not a search dimension: {dim!r}")
    if dim.when:
        conditions = [f"{k} in ({', '.join(map(str, v))})" if isinstance(v, list) else f"{k} = {v}"
                      for k, v in dim.when.items()]
        text += " if " + " and ".join(conditions)
    return text


def trials_view(spec: StudySpec, version: str) -> str:
    """The tag value of the view of `version`'s trials: ranked by the (first) objective, best first."""
    objective = spec.objectives[0]
    columns = (["tags.`dlsearch.state`"] + [f"metrics.`{summary_metric(o)}`" for o in spec.objectives]
               + [f"params.`{key}`" for key in spec.search]
               + [f"metrics.`{m}`" for m in ("epochs_run", "test_accuracy", "test_loss")] + ["attributes.`Duration`"])
    state = {
        "searchFilter": f"tags.`dlsearch.version` = '{_quote(version)}'",
        "orderByKey": f"metrics.`{summary_metric(objective)}`",
        "orderByAsc": objective.direction == "minimize",
        "selectedColumns": columns,
        "columnOrder": [_RUN_NAME, *columns],
        # wide enough for `trial-12 · pruned @ epoch 10 · 0.9618`, and for the objective's name
        "columnWidths": {_RUN_NAME: 260, **{f"metrics.`{summary_metric(o)}`": 150 for o in spec.objectives}},
        "runsHiddenMode": "SHOW_ALL",  # the charts draw every trial, not the first 10 rows
    }
    now_ms = int(time.time() * 1000)
    # MLflow's envelope: the view's name, times in ms, its state as JSON text.
    return json.dumps({"name": f"dlsearch: trials of {version}", "createdAt": now_ms, "updatedAt": now_ms,
                       "state": json.dumps(state)})


def _call(section: dict[str, Any]) -> str:
    """`tpe(n_startup_trials=4)` from a sampler's or pruner's section."""
    kind = section.pop("type")
    return f"{kind}({', '.join(f'{k}={v}' for k, v in section.items())})" if section else str(kind)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
