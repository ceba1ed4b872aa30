"""dlsearch: hyperparameter search for PyTorch on Ray Tune, Optuna and MLflow.

The library is usable without the CLI:

    from dlsearch import load_spec, run_study
    spec = load_spec("studies/digits.yaml", ["budget.trials=8"])
    summary = run_study(spec)
"""

from __future__ import annotations

__version__ = "0.1.0"

from dlsearch.config.spec import SpecError, StudySpec, load_spec  # noqa: E402

__all__ = ["SpecError", "StudySpec", "load_spec", "run_study", "__version__"]


def __getattr__(name: str):
    # Lazy: importing Ray, Optuna and MLflow costs seconds; `dlsearch validate` needs none of them.
    if name == "run_study":
        from dlsearch.tuner.runner import run_study

        return run_study
    raise AttributeError(name)
