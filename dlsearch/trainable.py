"""What runs inside a Ray Tune trial: the built-in loop (or the user's), reporting through Tune.

The trial only reports; it knows nothing of Optuna or MLflow (the driver does
those writes, fed by these reports). Each epoch's metrics go out through
`ray.tune.report`, with a checkpoint every `train.checkpoint_every` epochs so a
crashed worker resumes where it was. A last report, marked `dlsearch_final`,
carries how the trial ended, its test metrics and the best weights.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any, Mapping

import torch
from ray import tune

from dlsearch.config import trial_config
from dlsearch.data import load_data
from dlsearch.spec import StudySpec
from dlsearch.train import train_trial

FINAL = "dlsearch_final"  # marks the last report of a trial: not an epoch, never pruned on
STATE_FILE = "state.pt"  # resume state inside a Tune checkpoint
BEST_FILE = "best.pt"  # the best epoch's weights inside the final checkpoint


def run_trial(config: Mapping[str, Any], spec: StudySpec) -> None:
    """The Tune function trainable. `config` is what the driver's searcher suggested."""
    number = int(config["number"])
    cfg = trial_config(spec, config["params"], number)
    resume = _load_resume_state()
    try:
        data = load_data(cfg.data, cfg.data_seed)  # cached per worker: reused actors load it once
        result = train_trial(cfg, data, _report, resume=resume)
    except Exception as err:  # noqa: BLE001 - any error ends this trial as FAIL; the study goes on
        detail = traceback.format_exception_only(type(err), err)[-1].strip()
        tune.report({FINAL: 1, "state": "FAIL", "fail_reason": detail[:500]})
        return
    final = {
        FINAL: 1,
        "state": result.state,
        "fail_reason": result.fail_reason or "",
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch or 0,
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "epoch_time_s": result.epoch_time_s,
        **{f"best.{k}": v for k, v in result.best_metrics.items()},
    }
    if result.state == "COMPLETE" and result.best_state is not None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(result.best_state, Path(tmp) / BEST_FILE)
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))
    else:
        tune.report(final)


def _report(epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
    row = {**metrics, "epoch": epoch}
    if checkpoint is None:
        tune.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(checkpoint, Path(tmp) / STATE_FILE)
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))  # copied to storage before return


def _load_resume_state() -> dict | None:
    """The last checkpoint of this trial, when Ray restarted it after its worker died."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / STATE_FILE
        # Our own file, written by this trial: full unpickling is safe here.
        return torch.load(path, weights_only=False) if path.exists() else None
