"""Deep-learning practice a trial's steps use: the loss and predictions (softmax, or one logit for
two classes), image augmentation on the device, and the overfit diagnostic.

Pure torch, like the loop that calls it (`dlsearch.trial.train`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from dlsearch.config.trial_config import TrialConfig
from dlsearch.config.spec import AugmentSpec


def is_binary(cfg: TrialConfig, n_classes: int) -> bool:
    """One logit with sigmoid + binary cross-entropy (train.loss bce, or auto on 2 classes with a built-in model)."""
    if cfg.train.loss == "bce":
        if n_classes != 2:
            raise ValueError(f"train.loss: bce (one logit) needs 2 classes (got {n_classes}); use auto")
        return True
    # A custom factory's contract is one logit per class; it opts in to one logit with loss: bce.
    return cfg.train.loss == "auto" and n_classes == 2 and cfg.model.kind != "custom"


def n_outputs(cfg: TrialConfig, n_classes: int) -> int:
    """The width of the model's last layer: 1 for a binary task, else one logit per class."""
    return 1 if is_binary(cfg, n_classes) else n_classes


def loss_fn(logits: torch.Tensor, y: torch.Tensor, binary: bool, label_smoothing: float = 0.0,
            reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class logits `(N, C)`, or binary cross-entropy of one logit `(N, 1)`, in fp32.

    Label smoothing moves `label_smoothing` of the target's mass to the other classes (for one
    logit: the target becomes 1 - s/2 or s/2).
    """
    logits = logits.float()
    if binary:
        target = y.float() * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), target, reduction=reduction)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)


def predict(logits: torch.Tensor, binary: bool) -> torch.Tensor:
    """Class indices: the largest logit, or a positive single logit for class 1."""
    return (logits.squeeze(1) > 0).long() if binary else logits.argmax(1)


def make_augment(spec: AugmentSpec, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Random shifts and rotations of image batches `(N, C, H, W)`, one draw per sample; None when off.

    Runs on the batch's device (no CPU round trip). Pixels that come in from outside the image
    repeat the border (after normalization the background is not 0, so zero padding would not match).
    """
    if not (spec.shift_px or spec.rotate_deg):
        return None
    max_angle = math.radians(spec.rotate_deg)

    def augment(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"train.augment: transforms image batches (N, C, H, W) (got shape {tuple(x.shape)})")
        n, _, height, width = x.shape
        u = torch.rand(n, 3, device=x.device, generator=generator) * 2 - 1  # U(-1, 1): angle, dx, dy
        angle = u[:, 0] * max_angle
        cos, sin = angle.cos(), angle.sin()
        # affine_grid works in [-1, 1] image coordinates: s pixels are 2s/size of them.
        dx, dy = u[:, 1] * (2 * spec.shift_px / width), u[:, 2] * (2 * spec.shift_px / height)
        theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return augment


def find_overfit_epoch(history: list[Mapping[str, float]]) -> int | None:
    """The epoch where validation loss turned up for good while training loss kept falling, or None.

    That is the epoch after the lowest validation loss, when every later epoch stays above that
    low and the last training loss is below the one at the low: past it, the model fits noise.
    """
    val = [h["val_loss"] for h in history]
    if len(val) < 2:
        return None
    low = min(range(len(val)), key=val.__getitem__)
    if low == len(val) - 1 or history[-1]["train_loss"] >= history[low]["train_loss"]:
        return None
    return low + 2  # epochs count from 1; the turn is the epoch after the low
