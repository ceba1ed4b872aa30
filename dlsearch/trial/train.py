"""The training loop of one trial: pure torch, readable top to bottom.

`train_trial(cfg, data, report)` trains the configured model, calls
`report(epoch, metrics)` once per epoch (epochs count from 1, the same step
Optuna's pruners and MLflow's curves use), stops early when the objective
stops improving, keeps the best weights, and evaluates them on the test split.
The report callable may raise `TrialPruned` to stop the trial; it propagates.
Tensor data (`DataBundle`) is batched by indexing on the device; torch Datasets
(`DatasetBundle`, from a custom data factory) are read through DataLoaders.

Practice built in: softmax cross-entropy (with optional label smoothing), or one
logit with sigmoid + binary cross-entropy for 2-class tasks; gradient clipping
by global norm or by value; random shifts and rotations of training images on
the device; bf16 or fp16 (loss-scaled) autocast on CUDA; transfer learning from
`model.init_from` with `model.freeze`'s layers kept fixed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

from dlsearch.config.trial_config import TrialConfig
from dlsearch.trial.bookkeeping import LOSSES, BookRules, EpochBook
from dlsearch.trial.data import DataBundle, DatasetBundle
from dlsearch.trial.models import build_model
from dlsearch.trial.practice import find_overfit_epoch, is_binary, loss_fn, make_augment, n_outputs, predict
from dlsearch.trial.transfer import freeze, load_weights, read_state, set_train_mode


class TrialPruned(Exception):
    """Raised by a report callable when the trial should stop (pruned by the scheduler)."""


class Report(Protocol):
    """What the loop calls once per epoch; `checkpoint` comes every `train.checkpoint_every` epochs."""

    def __call__(self, epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None: ...


@dataclass
class TrialResult:
    """How one trial ended. `best_state` holds the best epoch's weights (on the CPU)."""

    state: str  # COMPLETE | FAIL
    epochs_run: int
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    test_loss: float | None = None
    test_accuracy: float | None = None
    epoch_time_s: float | None = None  # median over epochs
    overfit_epoch: int | None = None  # where validation loss turned up while training loss kept falling
    fail_reason: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)  # what a custom trainable returned
    final_checkpoint: Any = None  # a custom trainable's last checkpoint

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what `dlsearch train --json` prints."""
        return {
            "state": self.state,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "epoch_time_s": self.epoch_time_s,
            "overfit_epoch": self.overfit_epoch,
            "fail_reason": self.fail_reason,
            "final_metrics": self.final_metrics,
        }


def train_trial(
    cfg: TrialConfig,
    data: DataBundle | DatasetBundle,
    report: Report | None = None,
    *,
    resume: Mapping[str, Any] | None = None,
) -> TrialResult:
    """Train one trial. `resume` is a checkpoint dict given earlier to `report`."""
    t = cfg.train
    device = resolve_device(t.device)
    data = data.to(device)
    torch.manual_seed(cfg.seed)  # init, dropout
    # A DataLoader's sampler draws its order on the CPU; index batches draw theirs on the device.
    loaders = make_loaders(data, cfg, device) if isinstance(data, DatasetBundle) else None
    shuffle = loaders.generator if loaders else torch.Generator(device=device).manual_seed(cfg.seed)

    model = prepare_model(cfg, data.input_shape, data.n_classes, device)
    channels_last = use_channels_last(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # What runs the batches: the model, or its compiled form (same parameters; state dicts come
    # from `model`, whose keys have no `_orig_mod.` prefix).
    net = torch.compile(model, mode=t.compile_mode) if t.compile else model
    binary = is_binary(cfg, data.n_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(t.optimizer, params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    n_train = len(loaders.train.dataset) if loaders else len(data.y_train)
    steps_per_epoch = max(1, n_train // t.batch_size + (n_train % t.batch_size > 1))
    scheduler = make_scheduler(t, optimizer, steps_per_epoch)
    # Mixed precision halves activation memory and speeds up matmuls on CUDA; CPU stays fp32.
    # fp16 has a narrow range: its gradients are scaled up so that small ones do not flush to 0.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision) if device.type == "cuda" else None
    autocast = (lambda: torch.autocast("cuda", dtype=half)) if half is not None else contextlib.nullcontext
    augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    step = _Step(
        binary=binary, label_smoothing=t.label_smoothing, grad_clip=t.grad_clip, clip_mode=t.grad_clip_mode,
        scaler=torch.amp.GradScaler(device.type, enabled=half is torch.float16),
        augment=make_augment(t.augment, augment_rng), autocast=autocast, channels_last=channels_last,
    )

    rules = BookRules.for_trial(cfg)
    evaluate_test = (functools.partial(evaluate, net, data.x_test, data.y_test, autocast, binary=binary)
                     if loaders is None
                     else functools.partial(evaluate_loader, net, loaders.test, device, autocast, binary=binary))
    state = (_LoopState(book=EpochBook(rules)) if resume is None
             else _restore(resume, rules, model, optimizer, scheduler, shuffle, step.scaler, augment_rng))

    for epoch in range(state.epoch + 1, t.epochs + 1):
        # Early stopping, checked before the epoch so that a trial resumed from the checkpoint of
        # the epoch that stopped it stops there too; the best weights are restored below.
        if state.book.should_stop:
            break
        start = time.perf_counter()
        lr_now = optimizer.param_groups[0]["lr"]
        if loaders is None:
            perm = torch.randperm(len(data.y_train), device=device, generator=shuffle)
            batches = ((data.x_train[idx], data.y_train[idx]) for idx in perm.split(t.batch_size))
            train_loss, train_acc = _train_batches(net, optimizer, scheduler, batches, step, device)
            val_loss, val_acc = evaluate(net, data.x_val, data.y_val, autocast, binary=binary)
        else:
            batches = (_to_device(xb, yb, device) for xb, yb in loaders.train)
            train_loss, train_acc = _train_batches(net, optimizer, scheduler, batches, step, device)
            val_loss, val_acc = evaluate_loader(net, loaders.val, device, autocast, binary=binary)
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr_now,
            "epoch_time_s": time.perf_counter() - start,
            "generalization_gap": val_loss - train_loss,
        }
        state.history.append(metrics)
        state.epoch = epoch
        verdict = state.book.update(epoch, metrics[rules.metric], losses={k: metrics[k] for k in LOSSES})
        if verdict.diverged:
            bad = verdict.diverged
            reason = f"{bad} became {metrics[bad]} at epoch {epoch} (lr {t.lr:g}): the loss diverged"
            return _finish(state, model, evaluate_test, "FAIL", reason)
        if verdict.improved:
            state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        # verdict.should_stop is acted on before the next epoch (above), after this one is reported.

        if report is not None:
            if epoch % t.checkpoint_every == 0:
                report(epoch, metrics, checkpoint=_checkpoint(state, model, optimizer, scheduler, shuffle,
                                                              step.scaler, augment_rng))
            else:
                report(epoch, metrics)

    return _finish(state, model, evaluate_test, "COMPLETE", None)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Callable = contextlib.nullcontext,
    batch_size: int = 1024, *, binary: bool = False,
) -> tuple[float, float]:
    """Mean loss (cross-entropy, or binary cross-entropy of one logit) and accuracy of `model` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with torch.no_grad(), autocast():
        for i in range(0, len(y), batch_size):
            logits = model(x[i : i + batch_size])
            loss_sum += loss_fn(logits, y[i : i + batch_size], binary, reduction="sum")
            correct += (predict(logits, binary) == y[i : i + batch_size]).sum()
    model.train(was_training)
    n = max(1, len(y))
    return loss_sum.item() / n, correct.item() / n


def evaluate_loader(
    model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
    autocast: Callable = contextlib.nullcontext, *, binary: bool = False,
) -> tuple[float, float]:
    """`evaluate` over the batches of `loader`."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    with torch.no_grad(), autocast():
        for xb, yb in loader:
            xb, yb = _to_device(xb, yb, device)
            logits = model(xb)
            loss_sum += loss_fn(logits, yb, binary, reduction="sum")
            correct += (predict(logits, binary) == yb).sum()
            n += len(yb)
    model.train(was_training)
    n = max(1, n)
    return loss_sum.item() / n, correct.item() / n


@dataclass
class Loaders:
    """DataLoaders over a DatasetBundle's splits; `generator` draws the training order (resumable)."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    generator: torch.Generator


def make_loaders(data: DatasetBundle, cfg: TrialConfig, device: torch.device) -> Loaders:
    """Loaders with `data.n_workers` worker processes (default: the trial's CPU threads - 1).

    Workers read and decode the next batches while the model trains on this one; they persist
    across epochs (no restart cost per epoch). Pinned host memory lets batches go to a GPU
    asynchronously.
    """
    n_workers = cfg.data.n_workers if cfg.data.n_workers is not None else max(0, torch.get_num_threads() - 1)
    # The order has a generator of its own (the loader's draws the workers' seeds): it is the same
    # for any n_workers, and a resumed trial continues it exactly.
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.utils.data.RandomSampler(data.train, generator=generator)
    common = {"batch_size": cfg.train.batch_size, "num_workers": n_workers, "pin_memory": device.type == "cuda",
              "persistent_workers": n_workers > 0}
    return Loaders(
        train=torch.utils.data.DataLoader(data.train, sampler=order, **common),
        val=torch.utils.data.DataLoader(data.val, **common),
        test=torch.utils.data.DataLoader(data.test, **common),
        generator=generator,
    )


def prepare_model(cfg: TrialConfig, input_shape: tuple[int, ...], n_classes: int, device: torch.device) -> nn.Module:
    """The trial's model on `device`: built and initialised, loaded from `model.init_from`, frozen per `model.freeze`.

    `model.init_from` must be a local checkpoint file here (`dlsearch.tracking.tracker.with_local_source`
    fetches MLflow references); the random init draws from the seed set before the call.
    """
    model = build_model(cfg.model, input_shape, n_outputs(cfg, n_classes), base_dir=cfg.base_dir)
    if cfg.model.init_from is not None:
        load_weights(model, read_state(cfg.model.init_from))
    freeze(model, cfg.model.freeze)
    return model.to(device)


def use_channels_last(cfg: TrialConfig, device: torch.device) -> bool:
    """`train.memory_format`: channels_last as asked; auto picks it for CNNs on CUDA."""
    if cfg.train.memory_format == "auto":
        return cfg.model.kind == "cnn" and device.type == "cuda"
    return cfg.train.memory_format == "channels_last"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """sgd and rmsprop use momentum; adamw decouples weight decay, the others add it to the gradient (L2)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(t: Any, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per batch so every schedule is smooth."""
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, steps_per_epoch))


def lr_factor(t: Any, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of `train.lr` at optimizer step s (0-based) for the non-onecycle schedules."""
    total = t.epochs * steps_per_epoch
    if t.schedule == "constant":
        return lambda s: 1.0
    if t.schedule == "step":
        every = t.step_epochs * steps_per_epoch
        return lambda s: t.step_gamma ** (s // every)
    if t.schedule == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    warmup = max(1, round(t.warmup_epochs * steps_per_epoch))  # warmup_cosine
    return lambda s: (s + 1) / warmup if s < warmup else 0.5 * (
        1 + math.cos(math.pi * min(s - warmup, total - warmup) / max(1, total - warmup))
    )


# ---------------------------------------------------------------- helpers


@dataclass
class _Step:
    """How each optimizer step is taken: loss, clipping, fp16 loss scaling, augmentation, autocast."""

    binary: bool
    label_smoothing: float
    grad_clip: float
    clip_mode: str  # norm | value
    scaler: torch.amp.GradScaler  # a pass-through unless fp16 on CUDA
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    autocast: Callable
    channels_last: bool = False  # image batches go in as NHWC, as the model's weights are


@dataclass
class _LoopState:
    book: EpochBook
    epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _train_batches(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: _Step,
    device: torch.device,
) -> tuple[float, float]:
    """The optimizer steps of one epoch; mean loss and accuracy over the batches while training."""
    set_train_mode(model)  # frozen layers stay in eval mode
    # Sums stay on the device: one sync per epoch instead of one per batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for xb, yb in batches:
        if len(yb) < 2:
            continue  # a batch of one breaks batch norm and teaches nothing
        if step.augment is not None:
            xb = step.augment(xb)
        if step.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with step.autocast():
            logits = model(xb)
            loss = loss_fn(logits, yb, step.binary, step.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        step.scaler.scale(loss).backward()
        if step.grad_clip > 0:
            step.scaler.unscale_(optimizer)  # clip true gradients, not fp16-scaled ones
            if step.clip_mode == "value":
                torch.nn.utils.clip_grad_value_(params, step.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, step.grad_clip)
        step.scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        step.scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(yb)
        correct += (predict(logits.detach(), step.binary) == yb).sum()
        seen += len(yb)
    seen = max(1, seen)
    return loss_sum.item() / seen, correct.item() / seen


def _to_device(xb: torch.Tensor, yb: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # non_blocking: from pinned memory the copy overlaps the previous step's compute.
    return xb.to(device, non_blocking=True).float(), yb.to(device, non_blocking=True).long()


def _finish(
    state: _LoopState, model: nn.Module, evaluate_test: Callable[[], tuple[float, float]], status: str,
    reason: str | None,
) -> TrialResult:
    """Restore the best weights and evaluate them on the test split."""
    best_epoch = state.book.best_epoch
    result = TrialResult(
        state=status,
        epochs_run=state.epoch,
        best_epoch=best_epoch,
        best_metrics=dict(state.history[best_epoch - 1]) if best_epoch else {},
        epoch_time_s=statistics.median(h["epoch_time_s"] for h in state.history) if state.history else None,
        fail_reason=reason,
        overfit_epoch=find_overfit_epoch(state.history),
        history=state.history,
        best_state=state.best_state,
    )
    if status == "COMPLETE" and state.best_state is not None:
        model.load_state_dict(state.best_state)
        result.test_loss, result.test_accuracy = evaluate_test()
    return result


def _checkpoint(
    state: _LoopState, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, shuffle: torch.Generator, scaler: torch.amp.GradScaler,
    augment_rng: torch.Generator,
) -> dict[str, Any]:
    # state_dict() tensors share storage with the live model and optimizer: copy them, so a
    # checkpoint kept in memory still holds this epoch's state when training goes on.
    live = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict()})
    return {
        "epoch": state.epoch,
        # The book's fields under the keys checkpoints have always had: older ones still resume.
        "best_value": state.book.best_value,
        "best_epoch": state.book.best_epoch,
        "bad_epochs": state.book.epochs_without_improvement,
        "best_state": state.best_state,
        "history": list(state.history),
        **live,
        "scaler": scaler.state_dict(),
        "shuffle_rng": shuffle.get_state(),
        "augment_rng": augment_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def _restore(
    ckpt: Mapping[str, Any], rules: BookRules, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, shuffle: torch.Generator, scaler: torch.amp.GradScaler,
    augment_rng: torch.Generator,
) -> _LoopState:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    shuffle.set_state(ckpt["shuffle_rng"])
    if "scaler" in ckpt:  # checkpoints from before fp16 and augmentation have neither
        scaler.load_state_dict(ckpt["scaler"])
        augment_rng.set_state(ckpt["augment_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    return _LoopState(
        book=EpochBook(rules, best_epoch=ckpt["best_epoch"], best_value=ckpt["best_value"],
                       epochs_without_improvement=ckpt["bad_epochs"]),
        epoch=ckpt["epoch"],
        best_state=ckpt["best_state"],
        history=list(ckpt["history"]),
    )
