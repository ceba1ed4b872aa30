"""The search space in Optuna's terms: samplers, pruners, and define-by-run sampling.

Optuna lives here (and in the runner that drives the study); the spec only
asks `check_optuna_kwargs` whether a sampler's or pruner's keys are real.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any

import optuna

from dlsearch.spec import CategoricalDim, IntDim, PrunerSpec, SamplerSpec, StudySpec

_SAMPLERS = {
    "random": "RandomSampler",
    "grid": "GridSampler",
    "tpe": "TPESampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
}
_PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "patient": "PatientPruner",
    "threshold": "ThresholdPruner",
    "wilcoxon": "WilcoxonPruner",
}
# Keys dlsearch fills in itself rather than taking from the study file.
_SAMPLER_OWN_KEYS = {"seed", "search_space"}


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler, seeded from the study seed."""
    cls = getattr(optuna.samplers, _SAMPLERS[spec.sampler.type])
    kwargs = dict(spec.sampler.model_extra or {})
    if spec.sampler.type == "grid":
        kwargs["search_space"] = grid_space(spec)
    return cls(seed=spec.seed, **kwargs)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's Optuna pruner with the study file's keyword arguments."""
    return _pruner_from(spec.pruner.type, dict(spec.pruner.model_extra or {}))


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


def check_optuna_options(sampler: SamplerSpec, pruner: PrunerSpec) -> list[str]:
    """Problems with the sampler's and pruner's extra keys, as `sampler.KEY: ...` lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # building one is a check here
        return _check_options(sampler, pruner)


def _check_options(sampler: SamplerSpec, pruner: PrunerSpec) -> list[str]:
    kwargs = dict(sampler.model_extra or {})
    cls = getattr(optuna.samplers, _SAMPLERS[sampler.type])
    problems = _unknown_kwargs("sampler", sampler.type, cls, kwargs, _SAMPLER_OWN_KEYS)
    if not problems and sampler.type != "grid":  # the grid's only option is its space, built from search
        try:
            cls(**kwargs)
        except Exception as err:  # noqa: BLE001 - Optuna's own message is the best explanation
            # Name the key that caused it, as the pruner check does.
            key = next((k for k in kwargs if not _constructs(cls, {k: kwargs[k]})), None)
            problems.append(f"sampler.{key}: {err} (got {kwargs[key]!r})" if key else f"sampler: {err}")
    return problems + _check_pruner("pruner", pruner.type, dict(pruner.model_extra or {}))


# ---------------------------------------------------------------- helpers


def _constructs(cls: type, kwargs: dict[str, Any]) -> bool:
    try:
        cls(**kwargs)
    except Exception:  # noqa: BLE001
        return False
    return True


def _pruner_from(kind: str, kwargs: dict[str, Any]) -> optuna.pruners.BasePruner:
    cls = getattr(optuna.pruners, _PRUNERS[kind])
    if kind == "none":
        return cls()
    if kind == "patient":
        wrapped = dict(kwargs.pop("wrapped", None) or {"type": "none"})
        wrapped_kind = wrapped.pop("type", "median")
        inner = None if wrapped_kind == "none" else _pruner_from(wrapped_kind, wrapped)
        return cls(inner, **kwargs)
    return cls(**kwargs)


def _check_pruner(where: str, kind: Any, kwargs: dict[str, Any]) -> list[str]:
    if kind not in _PRUNERS:
        return [f"{where}.type: must be one of {', '.join(_PRUNERS)} (got {kind!r})"]
    cls = getattr(optuna.pruners, _PRUNERS[kind])
    own = {"wrapped_pruner"}
    extra_known = {"wrapped"} if kind == "patient" else set()
    problems = _unknown_kwargs(where, kind, cls, {k: v for k, v in kwargs.items() if k not in extra_known}, own)
    if kind == "patient" and "patience" not in kwargs:
        problems.append(f"{where}.patience: is required for the patient pruner")
    if kind == "percentile" and "percentile" not in kwargs:
        problems.append(f"{where}.percentile: is required for the percentile pruner")
    if kind == "patient" and kwargs.get("wrapped") is not None:
        wrapped = kwargs["wrapped"]
        if not isinstance(wrapped, dict):
            problems.append(f"{where}.wrapped: must be a pruner mapping such as {{type: median}} (got {wrapped!r})")
        else:
            inner = dict(wrapped)
            problems += _check_pruner(f"{where}.wrapped", inner.pop("type", "median"), inner)
    if problems:
        return problems
    try:
        _pruner_from(kind, dict(kwargs))
    except Exception as err:  # noqa: BLE001 - attribute Optuna's message to the key that caused it
        return [_attribute(where, kind, kwargs, err)]
    return []


def _attribute(where: str, kind: str, kwargs: dict[str, Any], err: Exception) -> str:
    required = {"percentile": {"percentile": 50.0}, "patient": {"patience": 1}}.get(kind, {})
    for key, value in kwargs.items():
        try:
            _pruner_from(kind, {**required, key: value})
        except Exception as one:  # noqa: BLE001
            return f"{where}.{key}: {one} (got {value!r})"
    return f"{where}: {err}"


def _unknown_kwargs(where: str, kind: str, cls: type, kwargs: dict[str, Any], own: set[str]) -> list[str]:
    params = [
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in own
    ]
    out = []
    for key in kwargs:
        if key == "seed":
            out.append(f"{where}.seed: dlsearch seeds the {where.split('.')[0]} from the study's `seed`; set that instead")
        elif key not in params:
            hint = difflib.get_close_matches(key, params, n=1, cutoff=0.6)
            takes = f"it takes {', '.join(params)}" if params else "it takes no options"
            out.append(f"{where}.{key}: unknown option for the {kind} {where.split('.')[0]}; "
                       + (f"did you mean {hint[0]}?" if hint else takes))
    return out


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
