"""Optuna's samplers and pruners by their study-file names, built and checked from keyword options.

Only Optuna here: no study types, so that the study file's checks (`dlsearch.config`) can ask
Optuna itself whether an option is right, with its own message, before anything runs.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any

import optuna

SAMPLERS = {
    "random": "RandomSampler",
    "grid": "GridSampler",
    "tpe": "TPESampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
}
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "asha": "SuccessiveHalvingPruner",  # with rungs tied to the epochs: asha_options
    "hyperband": "HyperbandPruner",
    "patient": "PatientPruner",
    "threshold": "ThresholdPruner",
    "wilcoxon": "WilcoxonPruner",
}
# Keys dlsearch fills in itself rather than taking from the study file.
_SAMPLER_OWN_KEYS = {"seed", "search_space"}



def sampler_from(kind: str, kwargs: dict[str, Any], seed: int | None = None,
                 concurrency: int = 1) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named `kind` (`tpe`, `random`, ...), with the study file's options;
    `concurrency`, the trials that run at once, resolves `n_startup_trials: auto`."""
    return getattr(optuna.samplers, SAMPLERS[kind])(seed=seed, **resolve_startup(kwargs, concurrency))


# `n_startup_trials: auto` (the default sampler's): random trials until as many have finished as
# run at once, and at least 3. TPE's model of 3 results beats Optuna's 10 random trials on one
# worker, but with 16 at once, trials asked from 3 results crowd around them (BENCHMARKS.md, LCBench).
MIN_STARTUP_TRIALS = 3


def resolve_startup(kwargs: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """`kwargs` with `n_startup_trials: auto` replaced by max(3, `concurrency`)."""
    if kwargs.get("n_startup_trials") != "auto":
        return dict(kwargs)
    return {**kwargs, "n_startup_trials": max(MIN_STARTUP_TRIALS, int(concurrency))}


def pruner_from(kind: str, kwargs: dict[str, Any], max_epochs: int | None = None) -> optuna.pruners.BasePruner:
    """The Optuna pruner named `kind` (`median`, `hyperband`, ...), with the study file's options;
    `max_epochs`, the most epochs a trial runs, places the rungs of `asha`."""
    if kind == "asha":
        kwargs = {**asha_options(max_epochs), **kwargs}
    return _pruner_from(kind, dict(kwargs))


# dlsearch's default pruner, chosen on LCBench's learning curves (BENCHMARKS.md, bench/lcbench.py):
# Optuna's asynchronous successive halving, but with its first rung at a share of the trial's
# epochs, where Optuna's `min_resource="auto"` guesses the first rung from the first finished
# trial; a third of the trials go on at each rung (Optuna's default keeps a quarter).
ASHA_FIRST_RUNG = 0.15  # of the most epochs a trial runs: 52 epochs -> rungs at 8 and 24
ASHA_REDUCTION_FACTOR = 3


def asha_options(max_epochs: int | None) -> dict[str, Any]:
    """The `asha` pruner's defaults for trials of up to `max_epochs` epochs."""
    first = max(1, round(ASHA_FIRST_RUNG * max_epochs)) if max_epochs else 1
    return {"min_resource": first, "reduction_factor": ASHA_REDUCTION_FACTOR, "min_early_stopping_rate": 0}


def check_optuna_options(sampler: str, sampler_kwargs: dict[str, Any], pruner: str,
                         pruner_kwargs: dict[str, Any], directions: list[str] | None = None,
                         n_epochs: int = 3) -> list[str]:
    """Problems with the sampler's and pruner's options, as `sampler.KEY: ...` lines: Optuna's word.

    Unknown keys are named with a "did you mean"; then both are built and, with the study's
    `directions`, used as a run would use them: a few trials asked, each reporting `n_epochs`
    steps to the pruner. An option of the right name but a wrong value or type (a `max_resource`
    of 0, a `n_startup_trials` that is not an integer) fails here, on its key, not in a run.
    """
    sampler_kwargs = resolve_startup(sampler_kwargs, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building and using them is a check here, not a study
        problems = _check_options(sampler, dict(sampler_kwargs), pruner, dict(pruner_kwargs))
        if problems or directions is None:
            return problems
        return _check_in_use(sampler, dict(sampler_kwargs), pruner, dict(pruner_kwargs), directions, n_epochs)


def _check_options(sampler: str, kwargs: dict[str, Any], pruner: str, pruner_kwargs: dict[str, Any]) -> list[str]:
    cls = getattr(optuna.samplers, SAMPLERS[sampler])
    problems = _unknown_kwargs("sampler", sampler, cls, kwargs, _SAMPLER_OWN_KEYS)
    if not problems and sampler != "grid":  # the grid's only option is its space, built from search
        try:
            cls(**kwargs)
        except Exception as err:  # noqa: BLE001 - Optuna's own message is the best explanation
            # Name the key that caused it, as the pruner check does.
            key = next((k for k in kwargs if not _constructs(cls, {k: kwargs[k]})), None)
            problems.append(f"sampler.{key}: {err} (got {kwargs[key]!r})" if key else f"sampler: {err}")
    return problems + _check_pruner("pruner", pruner, pruner_kwargs)


# ---------------------------------------------------------------- helpers


_PROBE_TRIALS = 3  # enough for every sampler's and pruner's first decisions to run their own code


def _check_in_use(sampler: str, kwargs: dict[str, Any], pruner: str, pruner_kwargs: dict[str, Any],
                  directions: list[str], n_epochs: int) -> list[str]:
    """Use the sampler (beside no pruner) and the pruner (beside a random sampler) in tiny in-memory
    studies; each complaint of Optuna's on the first key whose value alone still brings it."""
    problems = []
    # The grid's options are its space, built from `search` (and checked there).
    error = None if sampler == "grid" else _probe(sampler, kwargs, "none", {}, directions, n_epochs)
    if error is not None:
        key = next((k for k in kwargs if _probe(sampler, {k: kwargs[k]}, "none", {}, directions, n_epochs)), None)
        problems.append(f"sampler.{key}: {error} (got {kwargs[key]!r})" if key else f"sampler: {error}")
    error = _probe("random", {}, pruner, pruner_kwargs, directions, n_epochs)
    if error is not None:
        base = _REQUIRED.get(pruner, {})
        key = next((k for k in pruner_kwargs
                    if _probe("random", {}, pruner, {**base, k: pruner_kwargs[k]}, directions, n_epochs)), None)
        problems.append(f"pruner.{key}: {error} (got {pruner_kwargs[key]!r})" if key else f"pruner: {error}")
    return problems


_REQUIRED = {"percentile": {"percentile": 50.0}, "patient": {"patience": 1}}  # options a pruner cannot go without


def _probe(sampler: str, kwargs: dict[str, Any], pruner: str, pruner_kwargs: dict[str, Any],
           directions: list[str], n_epochs: int) -> str | None:
    """Optuna's complaint when a study with these uses them, or None."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per probe
    try:
        study = optuna.create_study(
            sampler=sampler_from(sampler, kwargs, seed=0),
            pruner=pruner_from(pruner, pruner_kwargs, n_epochs), directions=directions)
        for _ in range(_PROBE_TRIALS):
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            if len(directions) == 1:
                for step in range(1, max(1, n_epochs) + 1):
                    trial.report(x * step, step=step)
                    if trial.should_prune():
                        break
            study.tell(trial, [x] * len(directions))
    except Exception as err:  # noqa: BLE001 - Optuna's own message is the best explanation
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    finally:
        optuna.logging.set_verbosity(verbosity)
    return None


def _constructs(cls: type, kwargs: dict[str, Any]) -> bool:
    try:
        cls(**kwargs)
    except Exception:  # noqa: BLE001
        return False
    return True


def _pruner_from(kind: str, kwargs: dict[str, Any]) -> optuna.pruners.BasePruner:
    cls = getattr(optuna.pruners, PRUNERS[kind])
    if kind == "none":
        return cls()
    if kind == "patient":
        wrapped = dict(kwargs.pop("wrapped", None) or {"type": "none"})
        wrapped_kind = wrapped.pop("type", "median")
        inner = None if wrapped_kind == "none" else _pruner_from(wrapped_kind, wrapped)
        return cls(inner, **kwargs)
    return cls(**kwargs)


def _check_pruner(where: str, kind: Any, kwargs: dict[str, Any]) -> list[str]:
    if kind not in PRUNERS:
        return [f"{where}.type: must be one of {', '.join(PRUNERS)} (got {kind!r})"]
    cls = getattr(optuna.pruners, PRUNERS[kind])
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


