"""The debugging playbook's first checks, run before spending compute on a search.

1. the loss at initialization is about ln(n_classes) (the net starts unbiased);
2. gradients reach every trainable layer (no dead or frozen-by-mistake layers);
3. the model can overfit a tiny subset (64 samples) with regularization off;
4. the loss stays finite all along;
5. what it fit carries over to held-out samples better than guessing (labels that
   do not go with their inputs, e.g. shuffled, fit but teach nothing).
Each check gives pass/fail and the number behind it; failures get a diagnosis
that names the cause (the learning rate, a frozen or dead layer, the labels).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from dlsearch.config.trial_config import TrialConfig
from dlsearch.trial.data import DataBundle, DatasetBundle, first_samples
from dlsearch.trial.practice import is_binary, loss_fn, predict
from dlsearch.trial.train import make_optimizer, prepare_model, resolve_device
from dlsearch.trial.transfer import HEAD, freeze


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
    cfg = dataclasses.replace(cfg, model=cfg.model.model_copy(update={"dropout": 0.0}))
    model = prepare_model(cfg, data.input_shape, data.n_classes, device)
    binary = is_binary(cfg, data.n_classes)
    checks: list[Check] = []

    model.eval()
    with torch.no_grad():
        loss0 = loss_fn(model(x), y, binary).item()
    expected = math.log(data.n_classes)  # binary cross-entropy at p = 0.5 is ln 2 too
    # A net that starts confident (large logits) wastes its first epochs unlearning it.
    ok = math.isfinite(loss0) and abs(loss0 - expected) <= 0.5 * expected
    checks.append(Check(
        "loss at init ≈ ln(classes)", ok,
        f"{loss0:.3f} vs ln({data.n_classes}) = {expected:.3f}"
        + ("" if ok else ": the initial logits are far from uniform; check model.init and the output layer's scale"),
    ))
    checks.append(_gradient_check(cfg, model, x, y, binary))

    losses, acc = _overfit(cfg, model, x, y, n_steps, binary)
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
        + ("" if overfit else ": " + _diagnose(cfg, losses, checks)),
    ))
    if overfit:  # what a model that fit nothing learned is not a question
        checks.append(_signal_check(cfg, model, data, device, binary))
    return SanityResult(checks=checks, losses=losses)


def _gradient_check(cfg: TrialConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    binary: bool) -> Check:
    """Every trainable tensor gets a gradient; nothing is frozen that the study did not freeze; the head learns."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y, binary).backward()
    names = [n for n, _ in model.named_parameters()]
    on_purpose = set(freeze(model, cfg.model.freeze))  # idempotent: the names model.freeze covers
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n not in on_purpose]
    head = _head_names(names)
    problems = [f"the output layer is frozen by model.freeze ({', '.join(h for h in head if h in on_purpose)}): "
                "it keeps its random weights, so the model cannot learn the task; unfreeze it"] \
        if any(h in on_purpose for h in head) else []
    problems += [f"no gradient reaches {', '.join(dead)}"] if dead else []
    problems += [f"frozen (requires_grad=False): {', '.join(frozen)}"] if frozen else []
    n_learning = len(names) - len(dead) - len(frozen) - len(on_purpose)
    detail = f"{n_learning}/{len(names)} parameter tensors get a gradient"
    if on_purpose and not problems:
        detail += f" ({len(on_purpose)} frozen on purpose by model.freeze)"
    return Check("gradients reach every layer", not problems, detail + (f"; {'; '.join(problems)}" if problems else ""))


def _signal_check(cfg: TrialConfig, model: torch.nn.Module, data: DataBundle | DatasetBundle,
                  device: torch.device, binary: bool, n_val: int = 1000) -> Check:
    """The fitted model beats guessing the most common class on held-out samples, by more than chance allows."""
    x, y = (t.to(device) for t in first_samples(data, "val", n_val))
    model.eval()
    with torch.no_grad():
        acc = (predict(model(x), binary) == y).float().mean().item()
    base = torch.bincount(y).max().item() / len(y)  # accuracy of always answering the most common class
    # Three standard errors of a guesser's accuracy on len(y) samples, and at least 5 points.
    margin = max(0.05, 3 * math.sqrt(base * (1 - base) / len(y)))
    ok = acc >= base + margin
    detail = f"held-out accuracy {acc:.1%} vs {base:.1%} for always guessing the most common class ({len(y)} samples)"
    if not ok:
        cause = ("data.shuffle_labels is true: the training labels are permuted on purpose"
                 if cfg.data.shuffle_labels else "are the labels shuffled or misaligned with their inputs?")
        detail += (": the model memorized its training samples but learned nothing that carries over, as when "
                   f"the labels do not go with the inputs; {cause}")
    return Check("labels carry signal", ok, detail)


def _overfit(cfg: TrialConfig, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_steps: int,
             binary: bool) -> tuple[list[float], float]:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    # Constant lr and no weight decay: the schedule and regularization are not under test here.
    optimizer = make_optimizer(t.optimizer, params, lr=t.lr, momentum=t.momentum, weight_decay=0.0)
    losses: list[float] = []
    for _ in range(n_steps):
        loss = loss_fn(model(x), y, binary)
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
        acc = (predict(model(x), binary) == y).float().mean().item()
    return losses, acc


def _head_names(names: list[str]) -> list[str]:
    """The output layer's parameters: under `head.` in built-in models, else the last layer's."""
    head = [n for n in names if n.startswith(HEAD + ".")]
    if head or not names:
        return head
    last = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == last]


def _diagnose(cfg: TrialConfig, losses: list[float], checks: list[Check]) -> str:
    start, end = losses[0], losses[-1]
    lr = cfg.train.lr
    gradients = next(c for c in checks if c.name.startswith("gradients"))
    if not gradients.passed:  # a frozen or dead layer explains a model that cannot fit better than the lr
        return "see the gradient check: " + gradients.detail.split("; ", 1)[-1]
    if not math.isfinite(end):
        return f"the loss diverged to {end}; the learning rate {lr:g} is too high, try {lr / 100:g}"
    if end >= start * 0.9 or max(losses) > 2 * start:
        return (f"the loss did not fall (peak {max(losses):.3g}): the learning rate {lr:g} is too high "
                f"for {cfg.train.optimizer} (the updates overshoot); try {lr / 100:g}")
    return ("the loss fell but too slowly: raise train.lr (now "
            f"{lr:g}), or the model is too small (model.depth, model.width)")

