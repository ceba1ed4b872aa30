"""Tests for dlsearch.trial.sanity: the playbook passes a healthy model, and each failure names its cause.

All on scikit-learn's digits with the quickstart study's model, on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from dlsearch.trial import sanity
from dlsearch.trial import train as train_module
from dlsearch.cli.commands import main
from dlsearch.config.trial_config import TrialConfig, trial_config
from dlsearch.trial.data import DataBundle, load_data
from dlsearch.trial.models import build_model
from dlsearch.trial.sanity import SanityResult, run_sanity
from dlsearch.config.spec import load_spec

DIGITS_STUDY = Path(__file__).resolve().parents[1] / "studies" / "digits.yaml"


def digits(*overrides: str) -> tuple[TrialConfig, DataBundle]:
    cfg = trial_config(load_spec(DIGITS_STUDY, list(overrides) + ["train.device=cpu"]), {}, number=0)
    return cfg, load_data(cfg.data, cfg.data_seed)


def check(result: SanityResult, prefix: str) -> sanity.Check:
    (found,) = [c for c in result.checks if c.name.startswith(prefix)]
    return found


def test_sanity_passes_on_the_digits_quickstart() -> None:
    result = run_sanity(*digits())
    assert result.passed, [c for c in result.checks if not c.passed]
    assert [c.name.split()[0] for c in result.checks] == ["loss", "gradients", "loss", "overfits", "labels"]
    assert len(result.losses) == 200 and result.losses[-1] < 0.1 < result.losses[0]
    assert check(result, "gradients").detail.startswith("6/6 parameter tensors")


def test_a_huge_learning_rate_fails_the_overfit_check_and_blames_the_learning_rate() -> None:
    result = run_sanity(*digits("train.lr=100"), n_steps=50)
    assert not result.passed
    overfit = check(result, "overfits")
    assert not overfit.passed
    assert "learning rate 100 is too high" in overfit.detail and "try 1" in overfit.detail
    assert check(result, "gradients").passed  # the model itself is fine


def _build_then(change: Any) -> Any:
    def build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build_model(*args, **kwargs)
        change(model)
        return model

    return build


def _last_linear(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def test_a_frozen_last_layer_is_reported_by_the_gradient_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def freeze_head(model: torch.nn.Module) -> None:
        _last_linear(model)[1].requires_grad_(False)

    monkeypatch.setattr(train_module, "build_model", _build_then(freeze_head))
    cfg, data = digits()
    result = run_sanity(cfg, data, n_steps=20)
    head = _last_linear(build_model(cfg.model, data.input_shape, data.n_classes))[0]
    gradients = check(result, "gradients")
    assert not gradients.passed and not result.passed
    assert "4/6 parameter tensors" in gradients.detail
    assert f"frozen (requires_grad=False): {head}.weight, {head}.bias" in gradients.detail


def test_a_layer_no_gradient_reaches_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # A zero output layer passes no gradient back: every layer before it is dead at the first step.
    def zero_head(model: torch.nn.Module) -> None:
        with torch.no_grad():
            _last_linear(model)[1].weight.zero_()

    monkeypatch.setattr(train_module, "build_model", _build_then(zero_head))
    result = run_sanity(*digits(), n_steps=5)
    gradients = check(result, "gradients")
    assert not gradients.passed
    assert "2/6 parameter tensors" in gradients.detail
    assert "no gradient reaches hidden.0.linear.weight, hidden.0.linear.bias" in gradients.detail


def test_a_last_layer_frozen_by_the_study_is_named_by_the_gradient_check() -> None:
    result = run_sanity(*digits("model.freeze=[head]"), n_steps=50)
    gradients = check(result, "gradients")
    assert not gradients.passed
    assert "the output layer is frozen by model.freeze (head.weight, head.bias)" in gradients.detail
    assert not result.passed


def test_a_frozen_backbone_is_frozen_on_purpose_and_passes() -> None:
    gradients = check(run_sanity(*digits("model.freeze=backbone"), n_steps=5), "gradients")
    assert gradients.passed, gradients.detail
    assert gradients.detail == "2/6 parameter tensors get a gradient (4 frozen on purpose by model.freeze)"


def test_shuffled_labels_fit_but_fail_the_signal_check_which_names_them() -> None:
    healthy = check(run_sanity(*digits()), "labels")
    assert healthy.passed and float(healthy.detail.split("held-out accuracy ")[1].split("%")[0]) > 60
    result = run_sanity(*digits("data.shuffle_labels=true"))
    assert check(result, "overfits").passed  # 64 samples can be memorized whatever their labels
    signal = check(result, "labels")
    assert not signal.passed and not result.passed
    assert "labels do not go with the inputs" in signal.detail and "data.shuffle_labels is true" in signal.detail


def test_cli_sanity_exit_1_names_the_failure_and_the_learning_rate() -> None:
    result = CliRunner().invoke(main, ["sanity", str(DIGITS_STUDY), "--set", "train.lr=100", "--steps", "50"])
    assert result.exit_code == 1, result.output
    assert "FAIL overfits 64 samples" in result.output
    assert "learning rate" in result.output and "sanity failed" in result.output
    assert "Traceback" not in result.output


def test_cli_sanity_passes_with_exit_0() -> None:
    result = CliRunner().invoke(main, ["sanity", str(DIGITS_STUDY), "--samples", "32", "--steps", "150"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output and "sanity passed" in result.output
