"""Small study files for tests: digits (no download), every store inside one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Sections that are one choice each are replaced whole by a change; sections of independent
# settings (train, tracking, ...) are merged key by key, so a test names only what it changes.
_REPLACED = ("search", "objective", "sampler", "pruner")


def write_study(folder: Path, filename: str = "study.yaml", **changes: Any) -> Path:
    """A digits study whose stores all live in `folder`; wide lr so that bad trials get pruned."""
    study: dict[str, Any] = {
        "name": "e2e-digits",
        "seed": 3,
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "model": {"kind": "mlp", "depth": 1, "width": 32},
        "train": {"epochs": 6, "batch_size": 64, "early_stopping": {"patience": 10}},
        "search": {
            "train.lr": {"type": "float", "low": 1.0e-5, "high": 0.3, "log": True},
            "train.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
            "train.momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"train.optimizer": "sgd"}},
            "model.width": {"type": "categorical", "choices": [16, 32, 64]},
        },
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "sampler": {"type": "tpe", "n_startup_trials": 4},
        "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "budget": {"trials": 8},
        # One at a time: the sampler and pruner then see trials in a fixed order (deterministic).
        "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
        "tracking": {
            "uri": f"sqlite:///{folder}/mlflow.db",
            "artifacts": str(folder / "artifacts"),
            "optuna_storage": f"sqlite:///{folder}/optuna.db",
            "register_best": True,
        },
    }
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(study.get(key), dict) and key not in _REPLACED
        study[key] = {**study[key], **value} if merge else value
    path = folder / filename
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path
