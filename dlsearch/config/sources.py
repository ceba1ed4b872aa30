"""`model.init_from` references: their form, and the checkpoint file one names.

References: a checkpoint file (`best.pt`, the best weights a trial kept, or a
resume checkpoint), an MLflow run id (that run's `checkpoint/best.pt`), or a
registered model `models:/<name>@<alias>` / `models:/<name>/<version>`. Checked
here without torch or a store (for `dlsearch validate`); fetching from MLflow is
`dlsearch.tracking.tracker.fetch_checkpoint`, loading the weights `dlsearch.trial.transfer`.
"""

from __future__ import annotations

import re
from pathlib import Path

from dlsearch.errors import InputError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class SourceError(InputError):
    """The `model.init_from` source cannot be found or does not fit the model; the message says why."""

    key = "model.init_from"


def source_problem(ref: str, base_dir: str | Path | None = None) -> str | None:
    """What is wrong with the form of `ref`, or None. Files must exist; MLflow references are checked later."""
    if RUN_ID.match(ref) or MODEL_URI.match(ref):
        return None
    if ref.startswith("models:/"):
        return f"a registered model is models:/<name>@<alias> or models:/<name>/<version> (got {ref!r})"
    if find_file(ref, base_dir) is None:
        return (f"no checkpoint file {ref!r} (looked in {_places(ref, base_dir)}); give a file, an MLflow run id "
                "or models:/<name>@<alias>")
    return None


def find_file(ref: str, base_dir: str | Path | None = None) -> Path | None:
    """The checkpoint file `ref` names: absolute, or relative to the study's folder, then the working directory."""
    for candidate in _candidates(ref, base_dir):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _candidates(ref: str, base_dir: str | Path | None) -> list[Path]:
    path = Path(ref).expanduser()
    if path.is_absolute():
        return [path]
    return ([Path(base_dir) / path] if base_dir else []) + [Path.cwd() / path]


def _places(ref: str, base_dir: str | Path | None) -> str:
    return ", ".join(str(p.parent) for p in _candidates(ref, base_dir))
