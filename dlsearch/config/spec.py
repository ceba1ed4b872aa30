"""The study file: load it, apply `--set` overrides, validate everything at once.

Contract: `load_spec(path, overrides)` returns a frozen `StudySpec` or raises
`SpecError` holding every problem, one line each, as `path: what is wrong (got X)`.
Nothing after this module touches the raw YAML dict. The schema is `schema.py`, the
YAML reader `yaml_loader.py`, `--set` `overrides.py`, the rules `checks.py`; this
module joins them and is where the rest of dlsearch imports the study's types from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from dlsearch.config.checks import (dedupe, problems_of, problems_with_schema_errors, search_problems,  # noqa: F401
                                    unknown_keys)
from dlsearch.config.overrides import apply_overrides

# The study's types, re-exported: the rest of dlsearch imports them from here.
from dlsearch.config.schema import (  # noqa: F401
    ACTIVATIONS,
    DATASETS,
    IMAGE_DATASETS,
    IMAGE_SIDES,
    INITS,
    LOSSES,
    MODEL_KINDS,
    NORMS,
    OPTIMIZERS,
    PRUNERS,
    REPORTED_METRICS,
    SAMPLERS,
    SCHEDULES,
    SEARCHABLE_SECTIONS,
    SEQUENCE_KINDS,
    AugmentSpec,
    BudgetSpec,
    CategoricalDim,
    DataSpec,
    EarlyStoppingSpec,
    FloatDim,
    IntDim,
    ModelSpec,
    ObjectiveSpec,
    PrunerSpec,
    ResourcesSpec,
    SamplerSpec,
    Scalar,
    SearchDim,
    SpecError,
    StudySpec,
    TrackingSpec,
    TrainSpec,
)
from dlsearch.config.yaml_loader import parse_yaml, read_study_text


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read, override and validate a study file; raise SpecError with every problem."""
    path = Path(path)
    text = read_study_text(path)
    raw = parse_yaml(text, str(path))
    spec = spec_from_dict(raw, overrides, source=str(path), base_dir=path.resolve().parent)
    spec._path = path.resolve()
    spec._text = text
    return spec


def spec_from_dict(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<study>",
    base_dir: str | Path | None = None,
) -> StudySpec:
    """Validate a study given as a dict (the YAML document), after `--set` overrides.

    Entry points (`data.factory`, `model.factory`, `trainable`) are imported to check them,
    from `base_dir` (the study file's folder), the working directory or the installed packages.
    """
    problems: list[str] = []
    raw = apply_overrides(raw, overrides, problems)
    raw = _resolve_data_path(raw, base_dir)
    problems += unknown_keys(raw)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(dedupe(problems + problems_with_schema_errors(raw, err, base_dir))) from None
    problems += problems_of(raw, spec, base_dir)
    if problems:
        raise SpecError(dedupe(problems))
    spec._overrides = tuple(overrides)
    return spec


def _resolve_data_path(raw: dict, base_dir: str | Path | None) -> dict:
    """A relative `data.path` names a file beside the study file when there is one there, else in the cwd."""
    data = raw.get("data")
    path = data.get("path") if isinstance(data, dict) else None
    if base_dir is None or not isinstance(path, str) or not path or Path(path).is_absolute():
        return raw
    beside = Path(base_dir) / path
    if not beside.is_file():
        return raw
    return {**raw, "data": {**data, "path": str(beside.resolve())}}
