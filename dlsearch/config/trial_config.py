"""One trial's resolved configuration: the study's fixed values with the sampled ones merged in.

A `TrialConfig` is all a training function needs; it knows nothing of Optuna,
Ray or MLflow. Its flat form (`flat()`) gives the MLflow params, under the same
dotted paths the study file, `--set` and error messages use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel

from dlsearch.config.spec import CategoricalDim, DataSpec, IntDim, ModelSpec, ObjectiveSpec, StudySpec, TrainSpec


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial runs with. `params` holds only the values the search sampled."""

    study: str
    number: int
    seed: int  # this trial's seed (init, shuffling, dropout)
    data_seed: int  # the study's seed: every trial sees the same train/val split
    data: DataSpec
    model: ModelSpec
    train: TrainSpec
    objectives: tuple[ObjectiveSpec, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    trainable: str | None = None
    own: Mapping[str, Any] = field(default_factory=dict)  # a trainable's plain search keys: config["x"]
    base_dir: str | None = None  # the study file's folder, for resolving user code

    @property
    def objective(self) -> ObjectiveSpec:
        """The (first) objective: what early stopping and pruning watch."""
        return self.objectives[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict: what a custom trainable receives and what is logged as config.yaml."""
        return {
            "study": self.study,
            "number": self.number,
            "seed": self.seed,
            "data_seed": self.data_seed,
            "data": _dump(self.data),
            "model": _dump(self.model),
            "train": _dump(self.train),
            "objective": [o.model_dump() for o in self.objectives],
            "params": dict(self.params),
            "trainable": self.trainable,
            **self.own,
        }

    def flat(self) -> dict[str, Any]:
        """The full configuration as `{dotted.path: value}` (the MLflow params)."""
        out: dict[str, Any] = {"seed": self.seed}
        for section in ("data", "model", "train"):
            _flatten(_dump(getattr(self, section)), section, out)
        return {**out, **self.own}


def trial_seed(study_seed: int, number: int) -> int:
    """A well-mixed 31-bit seed from the study seed and the trial number."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0] & 0x7FFFFFFF)


def trial_config(spec: StudySpec, params: Mapping[str, Any], number: int = 0) -> TrialConfig:
    """Merge sampled `params` ({dotted path: value}) into the study's fixed values."""
    sections = {name: _dump(getattr(spec, name)) for name in ("data", "model", "train")}
    own = {}
    for path, value in params.items():
        if "." not in path:  # a trainable's plain key (validation allows them only there)
            own[path] = value
            continue
        section, *inner = path.split(".")
        node = sections[section]
        for part in inner[:-1]:
            node = node.setdefault(part, {})
        node[inner[-1]] = value
    return TrialConfig(
        study=spec.name,
        number=number,
        seed=trial_seed(spec.seed, number),
        data_seed=spec.seed,
        data=DataSpec.model_validate(sections["data"]),
        model=ModelSpec.model_validate(sections["model"]),
        train=TrainSpec.model_validate(sections["train"]),
        objectives=spec.objectives,
        params=dict(params),
        trainable=spec.trainable,
        own=own,
        base_dir=str(spec.path.parent) if spec.path else None,
    )


def one_run_params(spec: StudySpec) -> dict[str, Any]:
    """The values `dlsearch train` gives a trainable's plain search keys, which have no fixed value in
    a section: the middle of the range (the geometric middle with `log: true`; an int rounded down
    to its step), or the first choice. A plain key whose `when:` condition does not hold is left out."""
    values: dict[str, Any] = {}
    for key, dim in spec.search.items():
        if "." in key:
            continue
        if isinstance(dim, CategoricalDim):
            values[key] = dim.choices[0]
            continue
        middle = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
        if isinstance(dim, IntDim):
            middle = dim.low + int((middle - dim.low) // dim.step) * dim.step
        values[key] = middle
    return {k: v for k, v in values.items() if _holds(spec.search[k].when or {}, values, spec)}


def _holds(when: Mapping[str, Any], values: Mapping[str, Any], spec: StudySpec) -> bool:
    for path, expected in when.items():
        value = values[path] if path in values else spec.fixed_value(path)
        if value not in (expected if isinstance(expected, list) else [expected]):
            return False
    return True


def _dump(section: BaseModel) -> dict[str, Any]:
    return section.model_dump()  # includes a custom section's extra keys


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in node.items():
        if isinstance(value, Mapping):
            _flatten(value, f"{prefix}.{key}", out)
        else:
            out[f"{prefix}.{key}"] = value


def pinned_study(spec: StudySpec, params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The study as a plain dict, renamed to `name`, with the sampled `params` fixed: what `dlsearch best`
    prints, which `validate` accepts and `run` / `train` take.

    Only the keys the study file (and its `--set` overrides) gave are kept, so defaults stay implicit
    and keys that mean nothing for the study (`data.n_features` of digits) do not appear. Each dotted
    key of `params` is fixed in its section (what `train` runs) and each searched key is pinned to a
    one-choice categorical: `run` needs a search, and a trainable's plain key has no section to hold it.
    A searched key that `params` lacks stays searched where its `when:` holds with these values, and
    goes where it does not (a condition on a pinned key that can never hold again is invalid).
    """
    study = spec.model_dump(exclude_unset=True)
    study["name"] = name
    for path, value in params.items():
        if "." not in path:
            continue  # a trainable's plain key: pinned in the search below
        section, *inner = path.split(".")
        node = study.setdefault(section, {})
        for part in inner[:-1]:
            node = node.setdefault(part, {})
        node[inner[-1]] = value
    search: dict[str, Any] = {}
    for key, dim in spec.search.items():
        if key in params:
            search[key] = {"type": "categorical", "choices": [params[key]]}
        elif _holds(dim.when or {}, params, spec):
            search[key] = dim.model_dump(exclude_unset=True)
    for key, value in params.items():  # a key the study file no longer searches: the trial still ran with it
        search.setdefault(key, {"type": "categorical", "choices": [value]})
    study["search"] = search
    return {key: study[key] for key in StudySpec.model_fields if key in study}  # the schema's order
