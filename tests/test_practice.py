"""Tests for dlsearch.trial.practice, the training practice inside a trial: losses (label smoothing, one logit for two
classes), gradient clipping by norm or value, image augmentation in training only, the overfit
diagnostic, and the data options (resize, pad, shuffled labels) the transfer study and
`dlsearch sanity` rely on. Small digits, synthetic and CSV problems on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlsearch.config.spec import AugmentSpec, DataSpec, SpecError, load_spec
from dlsearch.config.trial_config import trial_config
from dlsearch.protocol import TrialEnd
from dlsearch.tracking.tracker import MlflowTracker
from dlsearch.trial import train as train_module
from dlsearch.trial.data import load_data
from dlsearch.trial.practice import find_overfit_epoch, is_binary, loss_fn, make_augment, n_outputs
from dlsearch.trial.train import train_trial
from tests.studies import write_study
from tests.test_train import data_for, make_cfg

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- losses


def test_label_smoothing_matches_its_definition_for_softmax_and_for_one_logit() -> None:
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    target = torch.full((8, 5), 0.1 / 5).scatter_(1, y[:, None], 1 - 0.1 + 0.1 / 5)
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean()
    assert loss_fn(logits, y, binary=False, label_smoothing=0.1).item() == pytest.approx(by_hand.item(), rel=1e-5)
    one, yb = torch.randn(8, 1), torch.randint(0, 2, (8,))
    soft = yb.float() * 0.8 + 0.1
    assert loss_fn(one, yb, binary=True, label_smoothing=0.2).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(one[:, 0], soft).item(), rel=1e-6)
    assert loss_fn(logits, y, False).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_two_classes_get_one_logit_unless_asked_otherwise() -> None:
    cfg = make_cfg(dataset="synthetic")
    two = make_cfg("data.n_classes=2", dataset="synthetic")
    assert n_outputs(cfg, 4) == 4 and not is_binary(cfg, 4)
    assert n_outputs(two, 2) == 1 and is_binary(two, 2)
    assert n_outputs(make_cfg("data.n_classes=2", "train.loss=cross_entropy", dataset="synthetic"), 2) == 2
    with pytest.raises(ValueError, match=r"train.loss: bce \(one logit\) needs 2 classes \(got 10\)"):
        # A searched loss reaches the trial unchecked (validation sees fixed values only).
        is_binary(dataclasses.replace(cfg, train=cfg.train.model_copy(update={"loss": "bce"})), 10)
    with pytest.raises(SpecError, match=r"train.loss: bce \(one logit\) needs 2 classes; digits has 10"):
        make_cfg("train.loss=bce")


def test_the_binary_csv_study_trains_one_logit_and_beats_the_majority_class(monkeypatch: pytest.MonkeyPatch
                                                                           ) -> None:
    monkeypatch.chdir(REPO)  # data.path is relative to where dlsearch runs
    spec = load_spec(REPO / "studies" / "breast_cancer.yaml", ["train.epochs=8", "train.device=cpu"])
    cfg = trial_config(spec, {}, number=0)
    data = load_data(cfg.data, cfg.data_seed)
    assert data.n_classes == 2
    result = train_trial(cfg, data)
    assert result.best_state["head.weight"].shape == (1, 64)  # one logit, not two
    majority = max(data.y_test.float().mean().item(), 1 - data.y_test.float().mean().item())
    assert result.test_accuracy > majority + 0.2, (result.test_accuracy, majority)
    assert result.best_metrics["val_loss"] < 0.5 * math.log(2)  # well below BCE at a coin flip


# ---------------------------------------------------------------- clipping


def one_step_change(mode: str, clip: float) -> torch.Tensor:
    """Every weight's change after one full-batch SGD step (lr 1, no momentum) with clipping."""
    cfg = make_cfg("train.epochs=1", "train.batch_size=100000", "train.optimizer=sgd", "train.momentum=0",
                   "train.lr=1", "train.schedule=constant", f"train.grad_clip={clip}", f"train.grad_clip_mode={mode}",
                   "model.dropout=0")
    torch.manual_seed(cfg.seed)
    before = train_module.prepare_model(cfg, (1, 8, 8), 10, torch.device("cpu")).state_dict()
    result = train_trial(cfg, data_for(cfg))
    return torch.cat([(result.best_state[k] - before[k]).flatten() for k in before])


def test_clipping_by_value_caps_each_gradient_and_by_norm_caps_their_norm() -> None:
    by_value = one_step_change("value", 1e-4).abs()
    assert by_value.max().item() == pytest.approx(1e-4, rel=1e-3)
    assert (by_value > 0.999e-4).sum() > 10  # many elements hit the cap
    by_norm = one_step_change("norm", 1e-4)
    assert by_norm.norm().item() == pytest.approx(1e-4, rel=1e-3)
    assert by_norm.abs().max().item() < 0.5e-4


# ---------------------------------------------------------------- augmentation


def test_augmentation_moves_and_turns_images_reproducibly() -> None:
    x = torch.zeros(4, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the middle
    shift = make_augment(AugmentSpec(shift_px=2), torch.Generator().manual_seed(0))
    moved = shift(x)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    centres = [(m[0] * torch.arange(9.0)[None, :]).sum() / m[0].sum() for m in moved]  # x of the pixel's mass
    assert all(abs(c - 4) <= 2 + 1e-4 for c in centres) and len({round(float(c), 3) for c in centres}) > 1
    again = make_augment(AugmentSpec(shift_px=2), torch.Generator().manual_seed(0))(x)
    assert torch.equal(moved, again)
    assert make_augment(AugmentSpec(), torch.Generator()) is None
    with pytest.raises(ValueError, match=r"train.augment: transforms image batches"):
        shift(torch.zeros(4, 20))


def test_augmented_inputs_reach_the_model_in_training_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bool, torch.Tensor]] = []
    real_build = train_module.build_model

    def build_and_watch(*args, **kwargs):  # a spy on the real model: records what it is fed
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append((m.training, inputs[0].detach().clone())))
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_watch)
    cfg = make_cfg("train.epochs=1", "train.augment.shift_px=1.5", "train.augment.rotate_deg=15")
    data = data_for(cfg)
    train_trial(cfg, data)
    rows = {tuple(r.flatten().tolist()) for r in torch.cat([data.x_train, data.x_val, data.x_test])}
    trained = torch.cat([x for training, x in seen if training])
    evaluated = torch.cat([x for training, x in seen if not training])
    assert len(trained) == len(data.y_train) and len(evaluated) == len(data.y_val) + len(data.y_test)
    assert sum(tuple(r.flatten().tolist()) in rows for r in trained) < 0.05 * len(trained)
    assert all(tuple(r.flatten().tolist()) in rows for r in evaluated)


def test_augmentation_of_flat_features_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="train.augment.shift_px: augmentation transforms images; dataset synthetic"):
        make_cfg("train.augment.shift_px=2", dataset="synthetic")


# ---------------------------------------------------------------- the overfit diagnostic


def curve(train: list[float], val: list[float]) -> list[dict[str, float]]:
    return [{"train_loss": t, "val_loss": v} for t, v in zip(train, val)]


@pytest.mark.parametrize(("train", "val", "expected"), [
    ([1.0, 0.8, 0.6, 0.4, 0.3], [1.0, 0.7, 0.75, 0.8, 0.9], 3),  # lowest at 2, up from 3 on
    ([1.0, 0.8, 0.6, 0.4], [1.0, 0.8, 0.6, 0.5], None),  # still improving
    ([1.0, 0.8, 0.9, 1.0], [1.0, 0.7, 0.8, 0.9], None),  # training loss rose too: not overfitting
    ([1.0, 0.8, 0.6, 0.4], [1.0, 0.7, 0.9, 0.65], None),  # came back below its low
    ([1.0], [1.0], None),
])
def test_overfit_epoch_is_where_validation_turned_up_while_training_kept_falling(train, val, expected) -> None:
    assert find_overfit_epoch(curve(train, val)) == expected


def test_an_overfitting_trial_reports_its_overfit_epoch_and_mlflow_tags_it(tmp_path: Path) -> None:
    # 60 digits, a wide net without dropout, a constant high lr: validation loss turns up early.
    cfg = make_cfg("data.subset=60", "train.epochs=25", "model.width=256", "model.dropout=0",
                   "train.schedule=constant", "train.early_stopping.patience=100")
    result = train_trial(cfg, data_for(cfg))
    assert result.overfit_epoch is not None
    assert result.overfit_epoch == find_overfit_epoch(result.history)
    assert result.summary()["overfit_epoch"] == result.overfit_epoch
    spec = load_spec(write_study(tmp_path))
    tracker = MlflowTracker(spec, spec.name)
    tracker.open()
    run_id = tracker.start(trial_config(spec, {}, number=0))
    tracker.end(run_id, "COMPLETE", final=TrialEnd.of(result))  # the trial's last report, as the driver gets it
    tags = tracker.client.get_run(run_id).data.tags
    assert tags["dlsearch.overfit_epoch"] == str(result.overfit_epoch)


# ---------------------------------------------------------------- data options


def test_resize_and_pad_make_digits_mnist_sized_with_background_margins() -> None:
    plain = load_data(DataSpec(dataset="digits"), seed=0)
    big = load_data(DataSpec(dataset="digits", resize=20, pad=4), seed=0)
    assert plain.input_shape == (1, 8, 8) and big.input_shape == (1, 28, 28)
    assert big.x_train.shape == (len(plain.y_train), 1, 28, 28)
    assert torch.equal(big.y_train, plain.y_train)
    border = torch.cat([big.x_train[:, :, :4].flatten(), big.x_train[:, :, -4:].flatten()])
    assert torch.allclose(border, border[0])  # the padding is one value: the normalized background
    assert big.x_train.mean().abs() < 1e-4 and (big.x_train.std() - 1).abs() < 1e-3  # normalized after


def test_shuffled_labels_permute_the_training_labels_only() -> None:
    plain = load_data(DataSpec(dataset="digits"), seed=0)
    shuffled = load_data(DataSpec(dataset="digits", shuffle_labels=True), seed=0)
    assert torch.equal(shuffled.x_train, plain.x_train)
    assert torch.equal(shuffled.y_train.sort().values, plain.y_train.sort().values)  # the same labels ...
    assert (shuffled.y_train == plain.y_train).float().mean() < 0.2  # ... on other images
    assert torch.equal(shuffled.y_val, plain.y_val) and torch.equal(shuffled.y_test, plain.y_test)


def test_resize_of_flat_data_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="data.resize: applies to image datasets"):
        make_cfg("data.resize=28", dataset="synthetic")
