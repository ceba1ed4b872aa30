"""The debugging playbook's first checks, run before spending compute on a search.

1. the loss at initialization is about ln(n_classes) (the net starts unbiased);
2. gradients reach every trainable layer (no dead or frozen-by-mistake layers);
3. the model can overfit a tiny subset (64 samples) with regularization off;
4. the loss stays finite all along.
Each check gives pass/fail and the number behind it; failures get a diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dlsearch.config import TrialConfig
from dlsearch.data import DataBundle, DatasetBundle, first_samples
from dlsearch.models import build_model
from dlsearch.train import make_optimizer, resolve_device


@dataclass
class Check:
    name: str
    passed: bool
    detail: str  # the number behind the verdict, and the diagnosis when it failed


@dataclass
class SanityResult:
    checks: list[Check]
    losses: list[float] = field(default_factory=list)  # the overfitting curve, one value per step

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def run_sanity(cfg: TrialConfig, data: DataBundle | DatasetBundle, n_samples: int = 64, n_steps: int = 200) -> SanityResult:
    """Run the playbook on the first `n_samples` training samples with the trial's model and optimizer."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    x, y = (t.to(device) for t in first_samples(data, "train", n_samples))
    # Regularization off: the question is whether the model *can* fit, not whether it generalizes.
    model_spec = cfg.model.model_copy(update={"dropout": 0.0})
    model = build_model(model_spec, data.input_shape, data.n_classes, base_dir=cfg.base_dir).to(device)
    checks: list[Check] = []

    model.eval()
    with torch.no_grad():
        loss0 = F.cross_entropy(model(x), y).item()
    expected = math.log(data.n_classes)
    # A net that starts confident (large logits) wastes its first epochs unlearning it.
    ok = math.isfinite(loss0) and abs(loss0 - expected) <= 0.5 * expected
    checks.append(Check(
        "loss at init ≈ ln(classes)", ok,
        f"{loss0:.3f} vs ln({data.n_classes}) = {expected:.3f}"
        + ("" if ok else ": the initial logits are far from uniform; check model.init and the output layer's scale"),
    ))

    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    problems = [f"no gradient reaches {', '.join(dead)}"] if dead else []
    problems += [f"frozen (requires_grad=False): {', '.join(frozen)}"] if frozen else []
    n_layers = sum(1 for _ in model.parameters())
    checks.append(Check(
        "gradients reach every layer", not problems,
        f"{n_layers - len(dead) - len(frozen)}/{n_layers} parameter tensors get a gradient"
        + (f"; {'; '.join(problems)}" if problems else ""),
    ))

    losses, acc = _overfit(cfg, model, x, y, n_steps)
    finite = all(math.isfinite(v) for v in losses)
    first_bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    checks.append(Check(
        "loss stays finite", finite,
        "finite at every step" if finite else
        f"the loss became {losses[first_bad]} at step {first_bad + 1}: it diverged; "
        f"lower train.lr (now {cfg.train.lr:g})",
    ))
    overfit = finite and acc == 1.0 and losses[-1] < 0.1
    checks.append(Check(
        f"overfits {len(y)} samples", overfit,
        f"loss {losses[0]:.3f} → {losses[-1]:.3g}, train accuracy {acc:.0%} after {n_steps} steps"
        + ("" if overfit else ": " + _diagnose(cfg, losses)),
    ))
    return SanityResult(checks=checks, losses=losses)


def _overfit(cfg: TrialConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_steps: int
             ) -> tuple[list[float], float]:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    # Constant lr and no weight decay: the schedule and regularization are not under test here.
    optimizer = make_optimizer(t.optimizer, params, lr=t.lr, momentum=t.momentum, weight_decay=0.0)
    losses: list[float] = []
    for _ in range(n_steps):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return losses, acc


def _diagnose(cfg: TrialConfig, losses: list[float]) -> str:
    start, end = losses[0], losses[-1]
    lr = cfg.train.lr
    if not math.isfinite(end):
        return f"the loss diverged to {end}; the learning rate {lr:g} is too high, try {lr / 100:g}"
    if end >= start * 0.9 or max(losses) > 2 * start:
        return (f"the loss did not fall (peak {max(losses):.3g}): the learning rate {lr:g} is too high "
                f"for {cfg.train.optimizer} (the updates overshoot); try {lr / 100:g}")
    return ("the loss fell but too slowly: raise train.lr (now "
            f"{lr:g}), or the model is too small (model.depth, model.width)")

