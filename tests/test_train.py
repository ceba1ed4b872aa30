"""Tests for dlsearch.trial.train: the per-epoch contract, early stopping, divergence, schedules,
determinism, pruning, checkpoints and resume, and the `dlsearch train` command.

Everything trains a small MLP on scikit-learn's digits (or the synthetic problem) on the CPU
for a few epochs, so the whole file runs in seconds and is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
from click.testing import CliRunner

from dlsearch.cli.commands import main
from dlsearch.config.trial_config import TrialConfig, trial_config
from dlsearch.trial.data import DataBundle, load_data
from dlsearch.trial.models import build_model
from dlsearch.config.spec import REPORTED_METRICS, TrainSpec, spec_from_dict
from dlsearch.trial.train import TrialPruned, evaluate, lr_factor, make_scheduler, train_trial

REPO = Path(__file__).resolve().parents[1]
DIGITS_STUDY = REPO / "studies" / "digits.yaml"
METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s", "generalization_gap"}


def make_cfg(*overrides: str, dataset: str = "digits", number: int = 0) -> TrialConfig:
    """A small digits (or synthetic) trial on the CPU; `overrides` are `--set` items."""
    raw = {
        "name": "test-train",
        "seed": 0,
        "data": {"dataset": dataset, "val_fraction": 0.2},
        "model": {"kind": "mlp", "depth": 1, "width": 32, "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 64, "lr": 1.0e-2, "device": "cpu"},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search": {},
    }
    return trial_config(spec_from_dict(raw, list(overrides)), {}, number)


def data_for(cfg: TrialConfig) -> DataBundle:
    return load_data(cfg.data, cfg.data_seed)


def curves(history: list[Mapping[str, float]]) -> list[dict[str, float]]:
    """The history without wall-clock times, which never repeat exactly."""
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


class Recorder:
    """A report callable that keeps every call; checkpoints are kept as handed over."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.metrics: list[dict[str, float]] = []
        self.checkpoints: dict[int, dict[str, Any]] = {}

    def __call__(self, epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        self.epochs.append(epoch)
        self.metrics.append(dict(metrics))
        if checkpoint is not None:
            self.checkpoints[epoch] = checkpoint


# ---------------------------------------------------------------- learning and the per-epoch contract


def test_loss_falls_on_digits_in_two_epochs() -> None:
    cfg = make_cfg("train.epochs=2")
    result = train_trial(cfg, data_for(cfg))
    first, second = result.history
    assert result.state == "COMPLETE" and result.epochs_run == 2
    assert second["train_loss"] < first["train_loss"]
    assert second["val_accuracy"] > 0.5  # chance is 0.1
    assert result.test_accuracy is not None and result.test_accuracy > 0.5


def test_every_epoch_reports_exactly_the_documented_metrics() -> None:
    cfg = make_cfg("train.epochs=3")
    report = Recorder()
    result = train_trial(cfg, data_for(cfg), report)
    assert report.epochs == [1, 2, 3]
    assert set(REPORTED_METRICS) == METRICS  # what the spec lets a study use as its objective
    for metrics in report.metrics:
        assert set(metrics) == METRICS
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
        assert metrics["generalization_gap"] == pytest.approx(metrics["val_loss"] - metrics["train_loss"])
        assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["epoch_time_s"] > 0
    assert curves(result.history) == curves(report.metrics)
    assert result.epoch_time_s == sorted(m["epoch_time_s"] for m in report.metrics)[1]  # the median
    assert set(result.summary()) >= {"state", "epochs_run", "best_metrics", "test_accuracy", "test_loss",
                                     "epoch_time_s"}


# ---------------------------------------------------------------- early stopping and the best weights


def test_early_stopping_fires_on_a_plateau() -> None:
    # At lr 1e-9 the weights do not move, so val_accuracy never improves after epoch 1.
    cfg = make_cfg("train.lr=1e-9", "train.epochs=20", "train.early_stopping.patience=2")
    report = Recorder()
    result = train_trial(cfg, data_for(cfg), report)
    assert result.state == "COMPLETE"
    assert result.epochs_run == 3 and report.epochs == [1, 2, 3]
    assert result.best_epoch == 1
    assert result.best_metrics == result.history[0]


def stopped_after_epoch_3() -> tuple:
    """A trial whose best epoch is 1 and that early stopping ends at epoch 3.

    Maximizing val_loss makes epoch 1 the best while training goes on improving the weights,
    so the last epoch's weights are clearly not the best ones.
    """
    cfg = make_cfg("train.epochs=20", "train.early_stopping.patience=2",
                   "objective.metric=val_loss", "objective.direction=maximize")
    data = data_for(cfg)
    report = Recorder()
    return cfg, data, report, train_trial(cfg, data, report)


def test_the_best_epochs_weights_are_kept_and_tested() -> None:
    cfg, data, report, result = stopped_after_epoch_3()
    assert (result.epochs_run, result.best_epoch) == (3, 1)
    assert result.best_state is not None
    for key, value in result.best_state.items():
        assert torch.equal(value, report.checkpoints[1]["model"][key]), key
    assert any(not torch.equal(v, report.checkpoints[3]["model"][k]) for k, v in result.best_state.items())

    model = build_model(cfg.model, data.input_shape, data.n_classes)
    model.load_state_dict(result.best_state)
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    assert (val_loss, val_acc) == pytest.approx((result.history[0]["val_loss"], result.history[0]["val_accuracy"]))
    assert evaluate(model, data.x_test, data.y_test) == pytest.approx((result.test_loss, result.test_accuracy))
    model.load_state_dict(report.checkpoints[3]["model"])
    assert evaluate(model, data.x_test, data.y_test)[0] != pytest.approx(result.test_loss)


# ---------------------------------------------------------------- divergence


def test_a_nan_in_the_data_fails_the_trial_naming_metric_and_epoch() -> None:
    cfg = make_cfg("train.epochs=5")
    data = data_for(cfg)
    x_train = data.x_train.clone()  # the cached bundle is shared: never modify it in place
    x_train[0] = float("nan")
    result = train_trial(cfg, dataclasses.replace(data, x_train=x_train))
    assert result.state == "FAIL" and result.epochs_run == 1
    assert "train_loss" in result.fail_reason and "epoch 1" in result.fail_reason
    assert result.test_accuracy is None and result.test_loss is None


def test_a_huge_learning_rate_diverges_to_fail() -> None:
    cfg = make_cfg("train.optimizer=sgd", "train.lr=1e6", "train.grad_clip=0", "train.epochs=5", dataset="synthetic")
    result = train_trial(cfg, data_for(cfg))
    assert result.state == "FAIL"
    assert "epoch 1" in result.fail_reason and "lr 1e+06" in result.fail_reason
    assert any(name in result.fail_reason for name in ("train_loss", "val_loss"))
    assert result.summary()["fail_reason"] == result.fail_reason


# ---------------------------------------------------------------- learning-rate schedules


def lr_sequence(schedule: str, epochs: int = 4, steps_per_epoch: int = 10, lr: float = 0.1, **extra: Any
                ) -> list[float]:
    """The lr of every optimizer step of a run, from make_scheduler on a one-parameter optimizer."""
    t = TrainSpec(schedule=schedule, epochs=epochs, lr=lr, **extra)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(t, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_constant_schedule() -> None:
    assert lr_sequence("constant") == pytest.approx([0.1] * 40)


def test_step_schedule_decays_by_gamma_every_step_epochs() -> None:
    lrs = lr_sequence("step", step_epochs=2, step_gamma=0.5)
    assert lrs[:20] == pytest.approx([0.1] * 20)  # epochs 1-2
    assert lrs[20:] == pytest.approx([0.05] * 20)  # epochs 3-4
    factor = lr_factor(TrainSpec(schedule="step", epochs=9, step_epochs=3, step_gamma=0.1), steps_per_epoch=5)
    assert [factor(s) for s in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_cosine_schedule_falls_monotonically_from_lr_to_near_zero() -> None:
    lrs = lr_sequence("cosine")
    assert lrs[0] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert lrs[20] == pytest.approx(0.05)  # half way
    assert lrs[-1] < 0.01 * 0.1


def test_warmup_cosine_rises_linearly_then_decays() -> None:
    lrs = lr_sequence("warmup_cosine", warmup_epochs=1.0)  # 10 warmup steps
    assert lrs[:10] == pytest.approx([0.1 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01 * 0.1


def test_onecycle_rises_to_lr_then_falls() -> None:
    lrs = lr_sequence("onecycle")
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 0 < peak < len(lrs) - 1
    assert lrs[peak] == pytest.approx(0.1, rel=0.02)
    assert all(b >= a for a, b in zip(lrs[: peak + 1], lrs[1 : peak + 1]))
    assert all(b <= a for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[0] < 0.1 / 10 and lrs[-1] < 0.1 / 1000


def test_reported_lr_follows_the_schedule() -> None:
    cfg = make_cfg("train.epochs=3", "train.schedule=warmup_cosine", "train.warmup_epochs=1.0")
    result = train_trial(cfg, data_for(cfg))
    lrs = [h["lr"] for h in result.history]  # the lr of each epoch's first step
    assert lrs[0] < lrs[1] and lrs[1] == pytest.approx(cfg.train.lr) and lrs[2] < lrs[1]


# ---------------------------------------------------------------- reproducibility


def test_same_seed_same_history_other_trial_other_history() -> None:
    cfg = make_cfg("train.epochs=2")
    data = data_for(cfg)
    first, again = train_trial(cfg, data), train_trial(cfg, data)
    assert curves(first.history) == curves(again.history)
    assert first.test_loss == again.test_loss
    other = train_trial(make_cfg("train.epochs=2", number=1), data)
    assert curves(other.history) != curves(first.history)


# ---------------------------------------------------------------- pruning, checkpoints, resume


def test_pruning_from_the_report_callable_propagates() -> None:
    cfg = make_cfg("train.epochs=5")
    epochs: list[int] = []

    def prune_at_two(epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        epochs.append(epoch)
        if epoch == 2:
            raise TrialPruned("below the median")

    with pytest.raises(TrialPruned, match="below the median"):
        train_trial(cfg, data_for(cfg), prune_at_two)
    assert epochs == [1, 2]


def test_checkpoints_come_every_checkpoint_every_epochs() -> None:
    cfg = make_cfg("train.epochs=5", "train.checkpoint_every=2")
    report = Recorder()
    train_trial(cfg, data_for(cfg), report)
    assert report.epochs == [1, 2, 3, 4, 5]
    assert sorted(report.checkpoints) == [2, 4]
    assert report.checkpoints[2]["epoch"] == 2 and len(report.checkpoints[2]["history"]) == 2


def test_resuming_from_a_checkpoint_finishes_like_an_uninterrupted_run() -> None:
    cfg = make_cfg("train.epochs=4", "train.checkpoint_every=2")
    data = data_for(cfg)
    report = Recorder()
    full = train_trial(cfg, data, report)
    # The checkpoint as handed over, kept in memory while training went on: it must be a snapshot.
    resumed_report = Recorder()
    resumed = train_trial(cfg, data, resumed_report, resume=report.checkpoints[2])
    assert resumed_report.epochs == [3, 4]
    assert curves(resumed.history) == curves(full.history)
    assert (resumed.best_epoch, resumed.test_loss, resumed.test_accuracy) == (
        full.best_epoch, full.test_loss, full.test_accuracy)
    for key, value in full.best_state.items():
        assert torch.equal(value, resumed.best_state[key]), key


def test_resuming_from_the_stopping_epochs_checkpoint_does_not_train_on() -> None:
    # A worker killed after its last report restarts from the checkpoint of the epoch that stopped it.
    cfg, data, report, full = stopped_after_epoch_3()
    assert full.epochs_run == 3
    resumed = train_trial(cfg, data, resume=report.checkpoints[3])
    assert resumed.epochs_run == 3
    assert curves(resumed.history) == curves(full.history)
    assert resumed.test_loss == full.test_loss


# ---------------------------------------------------------------- the `dlsearch train` command


def test_cli_train_json() -> None:
    result = CliRunner().invoke(main, ["train", str(DIGITS_STUDY), "--set", "train.epochs=2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "COMPLETE" and summary["epochs_run"] == 2
    assert set(summary["best_metrics"]) == METRICS
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert summary["test_loss"] > 0 and summary["epoch_time_s"] > 0


def test_cli_train_bad_override_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(main, ["train", str(DIGITS_STUDY), "--set", "train.epochs=0", "--json"])
    assert result.exit_code == 2
    assert "train.epochs" in result.output and "Traceback" not in result.output


def test_python_m_dlsearch_train_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dlsearch", "train", "studies/digits.yaml", "--set", "train.epochs=1", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["state"] == "COMPLETE" and summary["epochs_run"] == 1
    assert {"best_metrics", "test_accuracy", "test_loss", "epoch_time_s"} <= set(summary)


# ---------------------------------------------------------------- the GPU path's options, on the CPU


def test_channels_last_trains_a_cnn_as_the_default_layout_does() -> None:
    """NHWC is a layout, not a different model: the curve matches NCHW's to float rounding."""
    base = ("model.kind=cnn", "model.depth=1", "model.width=8", "train.epochs=2", "data.subset=400")
    nchw = train_trial(make_cfg(*base, "train.memory_format=contiguous"), data_for(make_cfg(*base)))
    nhwc = train_trial(make_cfg(*base, "train.memory_format=channels_last"), data_for(make_cfg(*base)))
    for a, b in zip(curves(nchw.history), curves(nhwc.history), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    model = build_model(make_cfg(*base).model, (1, 8, 8), 10)
    model.load_state_dict(nhwc.best_state)  # an NHWC checkpoint loads into a plain model


def test_a_compiled_model_trains_as_the_eager_one_and_checkpoints_plain_keys() -> None:
    """torch.compile (inductor, on the CPU here) changes how the model runs, not what it learns."""
    base = ("model.depth=1", "model.width=16", "train.epochs=1", "data.subset=300", "model.dropout=0")
    eager = train_trial(make_cfg(*base), data_for(make_cfg(*base)))
    compiled = train_trial(make_cfg(*base, "train.compile=true"), data_for(make_cfg(*base)))
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], abs=1e-3)
    assert compiled.history[0]["val_loss"] == pytest.approx(eager.history[0]["val_loss"], abs=1e-3)
    assert compiled.best_state.keys() == eager.best_state.keys()  # no `_orig_mod.` prefix
