"""The study's Optuna storage: opening it, and the versions of a study it holds."""

from __future__ import annotations

import optuna

from dlsearch.config.spec import StudySpec
from dlsearch.config.stores import tracking_uri


def study_versions(spec: StudySpec, storage: optuna.storages.BaseStorage) -> list[str]:
    """The Optuna study names of every version of this study, oldest first."""
    names = set(optuna.get_all_study_names(storage))
    versions = [spec.name] if spec.name in names else []
    n = 2
    while f"{spec.name}-v{n}" in names:
        versions.append(f"{spec.name}-v{n}")
        n += 1
    return versions


def open_storage(spec: StudySpec) -> optuna.storages.BaseStorage:
    url = tracking_uri(spec.tracking.optuna_storage)
    if url.startswith("sqlite:"):
        # Wait for a busy database instead of failing with "database is locked".
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)
