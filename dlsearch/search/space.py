"""A study's search space in Optuna's terms: its sampler and pruner, and define-by-run sampling."""

from __future__ import annotations

from typing import Any

import optuna

from dlsearch.config.spec import CategoricalDim, IntDim, StudySpec
from dlsearch.search.build import pruner_from, sampler_from


def make_sampler(spec: StudySpec, concurrency: int = 1) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler, seeded from the study seed; `concurrency` trials run at once."""
    kwargs = dict(spec.sampler.model_extra or {})
    if spec.sampler.type == "grid":
        kwargs["search_space"] = grid_space(spec)
    return sampler_from(spec.sampler.type, kwargs, seed=spec.seed, concurrency=concurrency)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's Optuna pruner with the study file's keyword arguments."""
    return pruner_from(spec.pruner.type, dict(spec.pruner.model_extra or {}), max_epochs(spec))


def max_epochs(spec: StudySpec) -> int:
    """The most epochs a trial of the study runs (`train.epochs`, or its range's top when searched)."""
    dim = spec.search.get("train.epochs")
    if isinstance(dim, IntDim):
        return int(dim.high)
    if isinstance(dim, CategoricalDim):
        return int(max(dim.choices))
    return int(spec.train.epochs)


def directions(spec: StudySpec) -> list[str]:
    return [o.direction for o in spec.objectives]


def suggest(trial: optuna.trial.BaseTrial, spec: StudySpec) -> dict[str, Any]:
    """Sample the search space define-by-run: a `when:` dimension only when its condition holds.

    Returns {dotted path: value} for the dimensions sampled in this trial.
    """
    sampled: dict[str, Any] = {}
    for key in _dependency_order(spec):
        dim = spec.search[key]
        if not _condition_holds(dim.when or {}, sampled, spec):
            continue
        if isinstance(dim, CategoricalDim):
            sampled[key] = trial.suggest_categorical(key, dim.choices)
        elif isinstance(dim, IntDim):
            sampled[key] = trial.suggest_int(key, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            sampled[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return sampled


def grid_space(spec: StudySpec) -> dict[str, list[Any]]:
    """Every value of every dimension, for the grid sampler (floats need a step)."""
    space: dict[str, list[Any]] = {}
    for key, dim in spec.search.items():
        if isinstance(dim, CategoricalDim):
            space[key] = list(dim.choices)
        elif isinstance(dim, IntDim):
            space[key] = list(range(dim.low, dim.high + 1, dim.step))
        elif dim.step is not None:
            n = int(round((dim.high - dim.low) / dim.step))
            # 15 significant digits drop float noise (0.1 * 3 = 0.30000000000000004), which Optuna
            # would see as out of range; the last point is `high` itself.
            space[key] = [float(f"{dim.low + i * dim.step:.15g}") for i in range(n)] + [dim.high]
    return space


def _dependency_order(spec: StudySpec) -> list[str]:
    """Search keys ordered so that a dimension comes after those its `when:` names."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(key: str) -> None:
        if key in order or key in visiting:
            return  # a cycle samples in file order; validation reports self-reference
        visiting.add(key)
        for dep in (spec.search[key].when or {}):
            if dep in spec.search:
                visit(dep)
        visiting.discard(key)
        order.append(key)

    for key in spec.search:
        visit(key)
    return order


def _condition_holds(when: dict[str, Any], sampled: dict[str, Any], spec: StudySpec) -> bool:
    for path, expected in when.items():
        if path in sampled:
            value = sampled[path]
        elif path in spec.search:
            return False  # the dimension it depends on was not sampled in this trial
        else:
            value = spec.fixed_value(path)
        allowed = expected if isinstance(expected, list) else [expected]
        if value not in allowed:
            return False
    return True
