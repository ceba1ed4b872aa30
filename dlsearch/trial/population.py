"""Batched populations of trials: K MLP trials that share their shapes, trained as one stacked model.

`train_population(cfgs, data, report)` trains every config in `cfgs` in this process at once;
`Population` is the same, a round (one epoch of each member) at a time, for a caller that adds
members as others end (`add`), stops them (`stop`) and saves and restores it (`state_dict`,
`Population.restore`: a restarted worker resumes every member where it was).
Each weight of the MLP is held as one tensor of shape `(K, ...)` (member k's `nn.Linear` weight
is row k), so a step is a few large matrix products instead of K small ones and K Python loops:

- activations are `(K, features, N)`; the first layer reads the same batch in every member, so
  it is ONE matmul of the K weights stacked `(K*H, D)` with the batch `(D, N)`; the later layers
  are batched products (`torch.baddbmm`), whose weight gradients come out in the weights' layout;
- the loss is the sum of the members' mean losses: its gradient in member k's rows is exactly
  the gradient of member k's own loss, as if it trained alone;
- the optimizer is Adam, AdamW or SGD with momentum written out over the stacked tensors, with
  one learning rate, weight decay and momentum per member; it follows torch.optim's formulas
  step for step (same operations, same order; on the CPU over row slices of ~1M elements, which
  stay in cache between its passes); the learning-rate schedule is torch's own scheduler, read
  once per step from a one-parameter stand-in optimizer;
- gradients are clipped by the global norm of EACH member's gradients, as
  `torch.nn.utils.clip_grad_norm_` does for one model (`clip_grad_norm_per_member_`).

Per member, as `dlsearch.trial.train.train_trial` does per trial: one curve of the same metrics
(`report(member, epoch, metrics)` once per epoch), early stopping on its own objective with its
best weights kept, a loss that turns NaN or inf fails that member only, and its best weights are
evaluated on the test split. Results are `TrialResult`s, in the order of `cfgs`.

Stopping a member (pruning): `report` returns False, or raises `dlsearch.trial.train.TrialPruned`
(or the round's answer names it); the member ends PRUNED after that epoch (its best weights kept,
no test evaluation, like a pruned trial). Members that end for any reason are dropped from the
stacked tensors at the round's end, so they cost nothing afterwards; the others' curves do not
depend on them (up to float rounding: the products change shape).

Members at different epochs (a refilled population): each member counts its own epochs, its
own optimizer steps (Adam's bias correction) and its position in the LR schedule, so a member
added at round 6 starts at its epoch 1 with fresh weights (from its seed), zero optimizer
state and the schedule's first step, beside members at their epoch 6; each ends at its own
`train.epochs`, early stopping or pruning. A completed member's best weights are evaluated on
the test split in the round it ends.

Batches: every member sees the same batches in the same order, drawn from a generator seeded
with `shuffle_seed` (default: the first member's seed), and the same augmented images (seed
`shuffle_seed + 1`). A member whose seed equals `shuffle_seed` therefore trains on exactly the
batches `train_trial` would give it, from exactly the weights it would start from (each
member's init draws from `torch.manual_seed(member seed)`), and its curve matches
`train_trial`'s to float rounding when dropout is off. Dropout masks come from one population
generator (seed `shuffle_seed + 2`), one independent mask per member, not from the global RNG
as in `train_trial`: statistically the same, not the same draws. A member that joins later
trains on the population's batches from that round on (its epoch 1 is the population's round).

What members must share (`stack_problems`, `group_stackable`): the whole `data:` section, the
model's shapes (`model.kind: mlp`, depth, width, activation, norm none/layer/batch), and every
`train.` key except `lr`, `weight_decay`, `momentum` and `optimizer`; adam and adamw mix in a
population, sgd needs a population of its own; rmsprop, `model.init_from`/`freeze`,
`train.precision: fp16` and custom trainables are not supported. Members may differ in
`train.lr`, `train.weight_decay`, `train.momentum`, `train.optimizer` (adam/adamw), `model.dropout`,
`model.init`, `seed` and their objective.

Pure torch, like the training loop it mirrors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from dlsearch.config.trial_config import TrialConfig
from dlsearch.trial.bookkeeping import LOSSES, BookRules, EpochBook
from dlsearch.trial.data import DataBundle, DatasetBundle
from dlsearch.trial.models import LEAKY_RELU_SLOPE, build_model
from dlsearch.trial.practice import find_overfit_epoch, is_binary, loss_fn, make_augment, n_outputs, predict
from dlsearch.trial.train import TrialPruned, TrialResult, make_optimizer, make_scheduler, resolve_device

# The keys members may differ in; every other key of `TrialConfig.flat()` must be equal.
VARYING = ("seed", "train.lr", "train.weight_decay", "train.momentum", "train.optimizer", "model.dropout",
           "model.init")
# Optimizers that share their state layout, and so a population.
FAMILIES = {"adam": "adam", "adamw": "adam", "sgd": "sgd"}
_ADAM_BETA2, _ADAM_EPS = 0.999, 1e-8  # torch.optim.Adam's defaults, which make_optimizer keeps
_BN_MOMENTUM, _NORM_EPS = 0.1, 1e-5  # nn.BatchNorm1d's and nn.LayerNorm's defaults
_EVAL_ROWS = 131072  # members x samples per evaluation chunk: bounds the activations' memory
_CPU_CHUNK_ELEMENTS = 2**20  # per elementwise optimizer pass on the CPU (see _row_chunks)


class PopulationReport(Protocol):
    """Called once per member and epoch; returning False (or raising TrialPruned) stops that member."""

    def __call__(self, member: int, epoch: int, metrics: Mapping[str, float]) -> bool | None: ...


def train_population(
    cfgs: Sequence[TrialConfig],
    data: DataBundle,
    report: PopulationReport | None = None,
    *,
    shuffle_seed: int | None = None,
    on_round: RoundReport | None = None,
) -> list[TrialResult]:
    """Train the members `cfgs` as one stacked model; one `TrialResult` per member, in order.

    `report(member, epoch, metrics)` gets member `member`'s metrics (the keys `train_trial`
    reports; `epoch_time_s` is the population's round) and may stop it: False or TrialPruned.
    `on_round(round)`, called once per round after `report`, sees every member that trained in it
    and answers with the members to stop and the newcomers to add (an `Answer`; None: neither):
    one round trip per round (Tune's). Newcomers get the indices after the last member's, in order.
    Raises ValueError, naming every key at fault, when the members cannot share a population,
    and TypeError for torch Datasets (a `DatasetBundle`) in place of tensors.
    """
    population = Population(cfgs, data, shuffle_seed=shuffle_seed)
    while population.training:
        round_ = population.run_round(report)
        answer = on_round(round_) if on_round is not None else None
        if answer is not None:
            population.stop(answer.stop)
            population.add(answer.add)
    return population.results()


@dataclass(frozen=True)
class Round:
    """One round of a population: every member still training ran one more epoch of its own.

    `metrics` and `epochs` hold each member that trained in the round (a newcomer is at its
    epoch 1 while the first members may be at epoch 7); `ended` those that ended in it: COMPLETE
    (their epochs done, or early stopping), FAIL (diverged) or PRUNED by `report`, each with its
    result (a completed member's test metrics and best weights included). `state()` is the
    population after the round, before its answer, for `Population.restore`.
    """

    index: int  # rounds the population has run, this one included (1, 2, ...)
    metrics: dict[int, dict[str, float]]
    epochs: dict[int, int]
    ended: dict[int, TrialResult]
    state: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Answer:
    """What a round's report decides: members to stop (PRUNED), and new members' configs."""

    stop: Sequence[int] = ()
    add: Sequence[TrialConfig] = ()


class RoundReport(Protocol):
    """Called once per round; answers with the members to stop and those to add."""

    def __call__(self, round_: Round) -> Answer | None: ...


class Population:
    """A population being trained: its members by index, the stacked model and optimizer, its batches.

    Each member keeps its own epoch, its own optimizer step count (Adam's bias correction) and
    its own position in the LR schedule, so members that joined later (`add`: fresh weights from
    their own seed, zero optimizer state, epoch 1) train beside members well into their run.
    Every member sees the population's batches, in the population's order.
    """

    def __init__(self, cfgs: Sequence[TrialConfig], data: DataBundle, *, shuffle_seed: int | None = None) -> None:
        if not cfgs:
            raise ValueError("population: needs at least one member config (got 0)")
        if isinstance(data, DatasetBundle):
            raise TypeError("population: needs tensor data (a DataBundle); torch Datasets from a custom data factory "
                            "are read through DataLoaders by train_trial only")
        check_stackable(cfgs)
        self.first = cfgs[0]
        t = self.first.train
        self.device = resolve_device(t.device)
        self.data = data.to(self.device)
        seed = self.first.seed if shuffle_seed is None else shuffle_seed
        self.shuffle = torch.Generator(device=self.device).manual_seed(seed)
        self.augment_rng = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.augment = make_augment(t.augment, self.augment_rng)
        self.binary = is_binary(self.first, self.data.n_classes)
        half = torch.bfloat16 if t.precision == "bf16" and self.device.type == "cuda" else None
        self.autocast = (lambda: torch.autocast("cuda", dtype=half)) if half is not None else contextlib.nullcontext
        n_train = len(self.data.y_train)
        steps_per_epoch = max(1, n_train // t.batch_size + (n_train % t.batch_size > 1))
        self.schedule = _schedule(self.first, steps_per_epoch)
        # The same per step, as tensors a member's position (its steps taken) indexes.
        self.schedule_lr = torch.tensor([lr for lr, _ in self.schedule], dtype=torch.float64, device=self.device)
        cycled = [c for _, c in self.schedule]
        self.schedule_cycled = (None if cycled[0] is None
                                else torch.tensor(cycled, dtype=torch.float64, device=self.device))
        self.members: dict[int, _Member] = {}
        self.rows: list[int] = []  # the member each row of the stacked tensors belongs to
        self.round = 0
        self.next_index = len(cfgs)  # newcomers' indices: never one a member had
        self.net = _StackedMLP([_initial_state(cfg, self.data) for cfg in cfgs], self.first.model, self.device)
        self.dropout = _Dropout([cfg.model.dropout for cfg in cfgs], self.net.width, self.device, seed + 2)
        self.optimizer = _StackedOptimizer(cfgs, self.net.params(), self.device)
        self.steps = torch.zeros(len(cfgs), dtype=torch.long, device=self.device)  # each row's optimizer steps
        for i, cfg in enumerate(cfgs):
            self.members[i] = _Member(cfg, EpochBook(BookRules.for_trial(cfg)))
            self.rows.append(i)

    @property
    def training(self) -> bool:
        return bool(self.rows)

    def add(self, cfgs: Sequence[TrialConfig]) -> list[int]:
        """New members at epoch 1: their own init (from their seed), zero optimizer state, the
        schedule's start. Raises ValueError when one cannot share this population. Their indices."""
        if not cfgs:
            return []
        check_stackable([self.first, *cfgs])
        new = list(range(self.next_index, self.next_index + len(cfgs)))
        self.next_index += len(cfgs)
        self.net.add([_initial_state(cfg, self.data) for cfg in cfgs])
        self.dropout.add([cfg.model.dropout for cfg in cfgs])
        self.optimizer.add(cfgs)
        self.steps = torch.cat([self.steps, torch.zeros(len(cfgs), dtype=torch.long, device=self.device)])
        for i, cfg in zip(new, cfgs):
            self.members[i] = _Member(cfg, EpochBook(BookRules.for_trial(cfg)))
        self.rows.extend(new)
        return new

    def stop(self, members: Iterable[int]) -> None:
        """Stop these members (PRUNED after their last epoch); members already ended are left as they are."""
        for i in members:
            if i in self.members and self.members[i].state is None:
                self.members[i].state = "PRUNED"
        self._drop_ended()

    def release(self, members: Iterable[int]) -> None:
        """Forget members that ended (their best weights and curve), once the caller holds their results:
        a population refilled many times then keeps only the members it trains."""
        for i in members:
            if i in self.members and self.members[i].state is not None:
                del self.members[i]

    def run_round(self, report: PopulationReport | None = None) -> Round:
        """One epoch of every member still training, each at its own epoch and schedule position."""
        self.round += 1
        start = time.perf_counter()
        first_step = self.steps.clamp(max=len(self.schedule) - 1).tolist()
        train_loss, train_acc = _train_epoch(self, self.first)
        val_loss, val_acc = _evaluate(self.net, self.data.x_val, self.data.y_val, self.binary, self.autocast)
        epoch_time_s = time.perf_counter() - start
        metrics: dict[int, dict[str, float]] = {}
        epochs: dict[int, int] = {}
        for row, i in enumerate(self.rows):
            member = self.members[i]
            m = {
                "train_loss": train_loss[row],
                "train_accuracy": train_acc[row],
                "val_loss": val_loss[row],
                "val_accuracy": val_acc[row],
                "lr": member.cfg.train.lr * self.schedule[first_step[row]][0],
                "epoch_time_s": epoch_time_s,
                "generalization_gap": val_loss[row] - train_loss[row],
            }
            epoch = member.epoch + 1
            member.end_epoch(epoch, m, functools.partial(self.net.member_state, row))
            metrics[i], epochs[i] = m, epoch
            if member.state is None and report is not None:
                try:
                    if report(i, epoch, m) is False:
                        member.state = "PRUNED"
                except TrialPruned:
                    member.state = "PRUNED"
            if member.state is None and (member.book.should_stop or epoch >= member.cfg.train.epochs):
                member.state = "COMPLETE"  # early stopping, or its epochs done
        ended = [i for i in self.rows if self.members[i].state is not None]
        self._test([i for i in ended if self.members[i].state == "COMPLETE"])
        self._drop_ended()
        return Round(self.round, metrics, epochs, {i: self.members[i].result() for i in ended}, self.state_dict)

    def results(self) -> list[TrialResult]:
        """Every member's result, in order of index (members still training: as they stand)."""
        return [self.members[i].result() for i in sorted(self.members)]

    def state_dict(self) -> dict[str, Any]:
        """The members still training and everything their next round depends on, on the CPU."""
        cpu = functools.partial(_to_device, device=torch.device("cpu"))
        return {
            "round": self.round,
            "first": self.first,  # the shapes, when no member is training (a round's answer may add some)
            "rows": list(self.rows),
            "members": {i: self.members[i] for i in self.rows},
            "next_index": self.next_index,
            "net": cpu(self.net.state()),
            "dropout": cpu(self.dropout.state()),
            "optimizer": cpu(self.optimizer.state_dict()),
            "steps": self.steps.cpu(),
            "generators": {"shuffle": self.shuffle.get_state(), "augment": self.augment_rng.get_state(),
                           "dropout": self.dropout.generator.get_state()},
        }

    @classmethod
    def restore(cls, state: Mapping[str, Any], data: DataBundle, *, shuffle_seed: int | None = None) -> Population:
        """The population `state_dict` saved, ready for its next round (`state["round"] + 1`)."""
        members: dict[int, _Member] = dict(state["members"])
        rows = list(state["rows"])
        population = cls([members[i].cfg for i in rows] or [state["first"]], data, shuffle_seed=shuffle_seed)
        device = population.device
        population.members = members
        population.rows = rows
        population.round = int(state["round"])
        population.net.load(_to_device(state["net"], device))
        population.dropout.load(_to_device(state["dropout"], device))
        population.optimizer.load_state_dict(_to_device(state["optimizer"], device))
        population.steps = state["steps"].to(device)
        generators = state["generators"]
        population.shuffle.set_state(generators["shuffle"])
        population.augment_rng.set_state(generators["augment"])
        population.dropout.generator.set_state(generators["dropout"])
        population.next_index = int(state["next_index"])
        return population

    def _test(self, done: list[int]) -> None:
        """Every completed member's best weights on the test split, as one stacked model."""
        done = [i for i in done if self.members[i].best_state is not None]
        if not done:
            return
        best = _StackedMLP([self.members[i].best_state for i in done], self.first.model, self.device)
        test_loss, test_acc = _evaluate(best, self.data.x_test, self.data.y_test, self.binary, self.autocast)
        for i, loss, acc in zip(done, test_loss, test_acc):
            self.members[i].test_loss, self.members[i].test_accuracy = loss, acc

    def _drop_ended(self) -> None:
        """Remove the rows of members that ended, so they cost nothing from here on."""
        kept = [row for row, i in enumerate(self.rows) if self.members[i].state is None]
        if len(kept) == len(self.rows):
            return
        keep = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.net.select(keep)
        self.optimizer.select(keep)
        self.dropout.select(keep)
        self.steps = self.steps[keep]
        self.rows = [self.rows[row] for row in kept]


def stack_problems(cfg: TrialConfig) -> list[str]:
    """Why `cfg` cannot be a population member at all (empty when it can), each naming its key."""
    problems = []
    if cfg.trainable is not None:
        problems.append(f"trainable: a custom trainable runs its own loop (got {cfg.trainable})")
    if cfg.model.kind != "mlp":
        problems.append(f"model.kind: populations stack mlp models only (got {cfg.model.kind})")
    if cfg.model.init_from is not None:
        problems.append(f"model.init_from: must be null in a population (got {cfg.model.init_from})")
    if cfg.model.freeze != "none":
        problems.append(f"model.freeze: must be none in a population (got {cfg.model.freeze})")
    if cfg.train.optimizer not in FAMILIES:
        problems.append(f"train.optimizer: must be one of {', '.join(FAMILIES)} in a population "
                        f"(got {cfg.train.optimizer})")
    if cfg.train.precision == "fp16":
        problems.append("train.precision: fp16 needs loss scaling, which populations do not do; use bf16 or fp32")
    return problems


def check_stackable(cfgs: Sequence[TrialConfig]) -> None:
    """Raise ValueError naming every key that keeps `cfgs` from sharing one population."""
    problems = [f"member {i}: {p}" for i, cfg in enumerate(cfgs) for p in stack_problems(cfg)]
    reference = _shared(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        for key, value in _shared(cfg).items():
            if value != reference[key]:
                detail = "; sgd cannot share a population with adam or adamw" if key == "train.optimizer" else ""
                problems.append(f"members differ in {key} ({_plain(reference[key], cfgs[0], key)} vs "
                                f"{_plain(value, cfg, key)}){detail}")
    if problems:
        unique = list(dict.fromkeys(problems))  # the same key differing in several members: say it once per pair
        raise ValueError("population: " + "; ".join(unique))


def group_stackable(cfgs: Sequence[TrialConfig]) -> list[list[int]]:
    """Indices of `cfgs` grouped into populations: equal on every shared key, in order of first appearance.

    A config that no population can train (`stack_problems`) gets a group of its own; hand it to
    `train_trial`.
    """
    groups: dict[Any, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = ("alone", i) if stack_problems(cfg) else tuple((k, repr(v)) for k, v in _shared(cfg).items())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def clip_grad_norm_per_member_(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip stacked gradients `(K, ...)` in place so that each member's global 2-norm is at most `max_norm`.

    Member k's norm is taken over row k of every tensor, exactly as `clip_grad_norm_` takes
    it over one model's gradients (same eps, same clamp); returns the K norms before clipping.
    """
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # (n_tensors, K)
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_member(coef, g))
    return total


# ---------------------------------------------------------------- helpers


@dataclass
class _Member:
    """One member's bookkeeping: what `train_trial`'s loop state holds for a trial."""

    cfg: TrialConfig
    book: EpochBook  # its own objective, min_delta and patience
    state: str | None = None  # None while training; COMPLETE | FAIL | PRUNED
    epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    fail_reason: str | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def end_epoch(self, epoch: int, metrics: dict[str, float], weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.history.append(metrics)
        self.epoch = epoch
        verdict = self.book.update(epoch, metrics[self.book.rules.metric], losses={k: metrics[k] for k in LOSSES})
        if verdict.diverged:
            bad = verdict.diverged
            self.state = "FAIL"
            self.fail_reason = (f"{bad} became {metrics[bad]} at epoch {epoch} (lr {self.cfg.train.lr:g}): "
                                "the loss diverged")
        elif verdict.improved:
            self.best_state = weights()

    def result(self) -> TrialResult:
        h, best_epoch = self.history, self.book.best_epoch
        return TrialResult(
            state=self.state or "COMPLETE",
            epochs_run=self.epoch,
            best_epoch=best_epoch,
            best_metrics=dict(h[best_epoch - 1]) if best_epoch else {},
            test_loss=self.test_loss,
            test_accuracy=self.test_accuracy,
            epoch_time_s=statistics.median(m["epoch_time_s"] for m in h) if h else None,
            overfit_epoch=find_overfit_epoch(h),
            fail_reason=self.fail_reason,
            history=h,
            best_state=self.best_state,
        )


class _StackedMLP:
    """K copies of `dlsearch.trial.models._mlp` in stacked tensors, keyed by the module's state_dict names.

    `hidden.{i}.linear.weight` is `(K, out, in)` (nn.Linear's layout, so row k is member k's
    weight as it is); norm parameters and BatchNorm statistics are `(K, width)`.
    """

    def __init__(self, states: Sequence[Mapping[str, torch.Tensor]], model: Any, device: torch.device) -> None:
        self.depth, self.width, self.norm, self.activation = model.depth, model.width, model.norm, model.activation
        self.names = list(states[0])
        self.device = device
        self.tensors = {name: torch.stack([s[name] for s in states]).to(device)
                        for name in self.names if not name.endswith("num_batches_tracked")}
        for name in self._param_names():
            self.tensors[name].requires_grad_(True)
        # BatchNorm's count of training batches, per row (members that joined later have seen fewer).
        self.n_batches = [int(_batches_tracked(s)) for s in states]

    def params(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self._param_names()]

    def member_state(self, row: int) -> dict[str, torch.Tensor]:
        """Row `row`'s weights as its own model's state_dict, copied to the CPU."""
        out = {}
        for name in self.names:
            if name.endswith("num_batches_tracked"):
                out[name] = torch.tensor(self.n_batches[row], dtype=torch.long)
            else:
                out[name] = self.tensors[name][row].detach().to("cpu", copy=True)
        return out

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows `keep` (new leaf tensors)."""
        params = set(self._param_names())
        for name, tensor in self.tensors.items():
            self.tensors[name] = tensor.detach()[keep].requires_grad_(name in params)
        self.n_batches = [self.n_batches[row] for row in keep.tolist()]

    def add(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Append rows holding `states` (new leaf tensors)."""
        params = set(self._param_names())
        for name, tensor in self.tensors.items():
            new = torch.stack([s[name] for s in states]).to(self.device, tensor.dtype)
            self.tensors[name] = torch.cat([tensor.detach(), new]).requires_grad_(name in params)
        self.n_batches += [int(_batches_tracked(s)) for s in states]

    def state(self) -> dict[str, Any]:
        return {"tensors": {n: t.detach() for n, t in self.tensors.items()}, "n_batches": list(self.n_batches)}

    def load(self, state: Mapping[str, Any]) -> None:
        params = set(self._param_names())
        self.tensors = {n: t.clone().requires_grad_(n in params) for n, t in state["tensors"].items()}
        self.n_batches = list(state["n_batches"])

    def forward(self, x: torch.Tensor, training: bool, dropout: _Dropout | None) -> torch.Tensor:
        """Logits `(K, n_outputs, N)` of every member for the batch `x` `(N, *input_shape)`.

        Activations are `(K, features, N)`: each layer is then `W @ h`, whose weight gradient
        `grad @ h^T` comes out contiguous in `W`'s own layout (cheap optimizer steps).
        """
        h = x.flatten(1)  # (N, D): the same input for every member
        for i in range(self.depth):
            h = self._linear(h, f"hidden.{i}.linear")
            if self.norm == "layer":
                w, b = self.tensors[f"hidden.{i}.norm.weight"], self.tensors[f"hidden.{i}.norm.bias"]
                normed = F.layer_norm(h.transpose(1, 2), (self.width,), eps=_NORM_EPS)  # over the features
                h = torch.addcmul(b[:, None], normed, w[:, None]).transpose(1, 2)
            elif self.norm == "batch":
                h = self._batch_norm(h, f"hidden.{i}.norm", training)
            h = _activate(h, self.activation)
            if training and dropout is not None:
                h = dropout(h)
        return self._linear(h, "head")

    def _linear(self, h: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]  # (K, out, in), (K, out)
        k, n_out, n_in = w.shape
        if h.dim() == 2:
            # A shared input (N, D): one (K*out, D) x (D, N) product, the members' weights stacked.
            y = torch.addmm(b.reshape(k * n_out, 1), w.reshape(k * n_out, n_in), h.t())
            return y.view(k, n_out, len(h))
        return torch.baddbmm(b[:, :, None], w, h)

    def _batch_norm(self, h: torch.Tensor, name: str, training: bool) -> torch.Tensor:
        # (K, width, N) read as one sample of K*width channels and length N: F.batch_norm then
        # normalises each member's unit over the batch (no copy), and updates every running
        # statistic in place through the stacked buffers' views.
        k, width, n = h.shape
        t = self.tensors
        out = F.batch_norm(h.reshape(1, k * width, n), t[f"{name}.running_mean"].view(-1),
                           t[f"{name}.running_var"].view(-1), t[f"{name}.weight"].reshape(-1),
                           t[f"{name}.bias"].reshape(-1), training, _BN_MOMENTUM, _NORM_EPS)
        if training and name == "hidden.0.norm":
            self.n_batches = [n + 1 for n in self.n_batches]
        return out.view(k, width, n)

    def _param_names(self) -> list[str]:
        return [n for n in self.names if n.endswith(("weight", "bias"))]


class _Dropout:
    """One dropout mask per member and layer, each member with its own rate.

    Each member holds a slot; masks are drawn for every slot and the rows read their own, so a
    member's masks do not depend on which others are still training. A newcomer takes the
    lowest slot a member that ended left free (a new slot when none is).
    """

    def __init__(self, rates: Sequence[float], width: int, device: torch.device, seed: int) -> None:
        self.n_slots = len(rates)
        self.slots = list(range(self.n_slots))  # per row
        self.device = device
        self.rates = torch.tensor(rates, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._index: torch.Tensor | None = None  # the rows' slots, None while row i holds slot i

    def select(self, keep: torch.Tensor) -> None:
        self.rates = self.rates[keep]
        self.slots = [self.slots[row] for row in keep.tolist()]
        self._reindex()

    def add(self, rates: Sequence[float]) -> None:
        free = sorted(set(range(self.n_slots)) - set(self.slots))
        for _ in rates:
            if free:
                self.slots.append(free.pop(0))
            else:
                self.slots.append(self.n_slots)
                self.n_slots += 1
        self.rates = torch.cat([self.rates, torch.tensor(rates, device=self.device, dtype=self.rates.dtype)])
        self._reindex()

    def state(self) -> dict[str, Any]:
        return {"n_slots": self.n_slots, "slots": list(self.slots), "rates": self.rates}

    def load(self, state: Mapping[str, Any]) -> None:
        self.n_slots, self.slots, self.rates = int(state["n_slots"]), list(state["slots"]), state["rates"]
        self._reindex()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not bool((self.rates > 0).any()):
            return h
        u = torch.rand((self.n_slots, *h.shape[1:]), device=h.device, generator=self.generator)
        if self._index is not None:
            u = u[self._index]
        p = self.rates[:, None, None]
        # nn.Dropout: keep with probability 1 - p and scale the kept units by 1 / (1 - p).
        return h * ((u >= p).to(h.dtype) / (1 - p))

    def _reindex(self) -> None:
        identity = self.slots == list(range(self.n_slots))
        self._index = None if identity else torch.tensor(self.slots, dtype=torch.long, device=self.device)


class _StackedOptimizer:
    """Adam/AdamW or SGD with momentum over stacked tensors, one lr, weight decay and momentum per member.

    Each line follows torch.optim's single-tensor step (`_single_tensor_adam`, `_single_tensor_sgd`)
    with the member's values in place of the group's scalars; weight decay is L2 (added to the
    gradient) for adam and sgd, decoupled for adamw. Each member counts its own steps (Adam's
    bias correction), so a member added later starts as a fresh torch optimizer does.
    """

    _VECTORS = ("lr", "l2", "decoupled", "momentum", "n_steps")

    def __init__(self, cfgs: Sequence[TrialConfig], params: list[torch.Tensor], device: torch.device) -> None:
        self.family = FAMILIES[cfgs[0].train.optimizer]
        self.device = device
        self.lr, self.l2, self.decoupled, self.momentum, self.n_steps = self._vectors(cfgs)
        n_state = 2 if self.family == "adam" else 1  # exp_avg, exp_avg_sq | momentum_buffer
        self.state = [[torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(n_state)]
                      for p in params]

    def select(self, keep: torch.Tensor) -> None:
        for name in self._VECTORS:
            setattr(self, name, getattr(self, name)[keep])
        self.state = [[s[keep] for s in group] for group in self.state]

    def add(self, cfgs: Sequence[TrialConfig]) -> None:
        for name, new in zip(self._VECTORS, self._vectors(cfgs)):
            setattr(self, name, torch.cat([getattr(self, name), new]))
        self.state = [[torch.cat([s, s.new_zeros((len(cfgs), *s.shape[1:]))]) for s in group] for group in self.state]

    def state_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self._VECTORS}, "state": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self._VECTORS:
            setattr(self, name, state[name])
        self.state = [list(group) for group in state["state"]]

    def _vectors(self, cfgs: Sequence[TrialConfig]) -> list[torch.Tensor]:
        def vec(values: list[float]) -> torch.Tensor:  # float64: the scalars torch.optim keeps are Python floats
            return torch.tensor(values, dtype=torch.float64, device=self.device)

        decay = [c.train.weight_decay for c in cfgs]
        return [vec([c.train.lr for c in cfgs]),
                vec([wd if c.train.optimizer != "adamw" else 0.0 for c, wd in zip(cfgs, decay)]),
                vec([wd if c.train.optimizer == "adamw" else 0.0 for c, wd in zip(cfgs, decay)]),
                vec([c.train.momentum for c in cfgs]),
                vec([0.0] * len(cfgs))]

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor], lr_factor: torch.Tensor,
             cycled: torch.Tensor | None) -> None:
        """One step of every member at `lr * lr_factor` (per member, `(K,)` float64); `cycled` is the
        beta1 (adam) or momentum (sgd) a onecycle schedule sets, per member, else None."""
        self.n_steps += 1
        lr = self.lr * lr_factor
        # Terms that are 0 for every member are skipped: adding 0 or scaling by 1 changes nothing.
        l2 = self.l2.float() if bool((self.l2 != 0).any()) else None
        if self.family == "adam":
            beta1 = torch.full_like(self.n_steps, 0.9) if cycled is None else cycled
            bias_correction1 = 1 - beta1**self.n_steps
            bias_correction2_sqrt = torch.sqrt(1 - _ADAM_BETA2**self.n_steps).float()
            step_size = (lr / bias_correction1).float()
            # One beta1 for all (no onecycle): a Python float, as torch.optim's own step takes it.
            same = None if cycled is not None else 0.9
            weight = (1 - beta1).float()
            shrink = (1 - lr * self.decoupled).float() if bool((self.decoupled != 0).any()) else None
            for p, g, (exp_avg, exp_avg_sq) in zip(params, grads, self.state):
                for rows in _row_chunks(p):
                    _adam(p[rows], g[rows], exp_avg[rows], exp_avg_sq[rows],
                          1 - same if same is not None else weight[rows], bias_correction2_sqrt[rows],
                          step_size[rows], None if shrink is None else shrink[rows], None if l2 is None else l2[rows])
        else:
            momentum = (self.momentum if cycled is None else cycled).float()
            lr32 = lr.float()
            for p, g, (buf,) in zip(params, grads, self.state):
                for rows in _row_chunks(p):
                    _sgd(p[rows], g[rows], buf[rows], momentum[rows], lr32[rows], None if l2 is None else l2[rows])


def _adam(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          one_minus_beta1: float | torch.Tensor, bias_correction2_sqrt: torch.Tensor, step_size: torch.Tensor,
          shrink: torch.Tensor | None, l2: torch.Tensor | None) -> None:
    """torch.optim.Adam's (AdamW's) single-tensor update of rows `(k, ...)`, per-member values `(k,)`."""
    if shrink is not None:
        p.mul_(_per_member(shrink, p))  # AdamW: decoupled decay, 1 - lr * weight_decay
    if l2 is not None:
        g = g.addcmul(p, _per_member(l2, p))  # Adam: L2, weight_decay * param added to the gradient
    exp_avg.lerp_(g, one_minus_beta1 if isinstance(one_minus_beta1, float) else _per_member(one_minus_beta1, p))
    exp_avg_sq.mul_(_ADAM_BETA2).addcmul_(g, g, value=1 - _ADAM_BETA2)
    denom = (exp_avg_sq.sqrt() / _per_member(bias_correction2_sqrt, p)).add_(_ADAM_EPS)
    p.sub_(exp_avg.mul(_per_member(step_size, p)).div_(denom))


def _sgd(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, momentum: torch.Tensor, lr: torch.Tensor,
         l2: torch.Tensor | None) -> None:
    """torch.optim.SGD's single-tensor update (dampening 0, no nesterov) of rows `(k, ...)`."""
    if l2 is not None:
        g = g.addcmul(p, _per_member(l2, p))
    # torch starts the buffer as a copy of the first gradient: 0 * momentum + g is that.
    buf.mul_(_per_member(momentum, p)).add_(g)
    p.sub_(buf * _per_member(lr, p))


def _row_chunks(t: torch.Tensor) -> list[slice]:
    """Row slices of `t` `(K, ...)` for the optimizer's elementwise passes.

    On the CPU a pass over all K rows of a large tensor (MNIST's first layer: K x 400k floats)
    streams each of its ~10 temporaries through main memory; slices of ~1M elements stay in
    cache between passes and run about 2x faster. A GPU takes the whole tensor at once.
    """
    k = t.shape[0]
    if t.device.type != "cpu":
        return [slice(0, k)]
    rows = max(1, _CPU_CHUNK_ELEMENTS // max(1, t[0].numel()))
    return [slice(a, a + rows) for a in range(0, k, rows)]


def _train_epoch(population: Population, cfg: TrialConfig) -> tuple[list[float], list[float]]:
    """One epoch of optimizer steps for every member; their mean train loss and accuracy.

    Each member's learning rate (and onecycle's beta1 or momentum) is read at its own position
    in the schedule: `population.steps`, the steps it has taken.
    """
    t = cfg.train
    net, optimizer, dropout, data = population.net, population.optimizer, population.dropout, population.data
    params = net.params()
    k = params[0].shape[0]
    device = data.y_train.device
    schedule_lr, schedule_cycled = population.schedule_lr, population.schedule_cycled
    last = len(schedule_lr) - 1
    loss_sum = torch.zeros(k, device=device)  # on the device: one sync per epoch
    correct = torch.zeros(k, device=device, dtype=torch.long)
    seen = 0
    perm = torch.randperm(len(data.y_train), device=device, generator=population.shuffle)
    for idx in perm.split(t.batch_size):
        if len(idx) < 2:
            continue  # as train_trial: a batch of one breaks batch norm and teaches nothing
        xb, yb = data.x_train[idx], data.y_train[idx]
        if population.augment is not None:
            xb = population.augment(xb)
        with population.autocast():
            logits = net.forward(xb, True, dropout)  # (K, C, N): loss_fn reads dim 1 as the classes
            losses = loss_fn(logits, yb.expand(k, -1), population.binary, t.label_smoothing,
                             reduction="none").mean(1)
        # Member k's rows of the gradient of the sum are the gradient of its own loss.
        grads = torch.autograd.grad(losses.sum(), params)
        if t.grad_clip > 0:
            if t.grad_clip_mode == "value":
                for g in grads:
                    g.clamp_(-t.grad_clip, t.grad_clip)
            else:
                clip_grad_norm_per_member_(grads, t.grad_clip)
        position = population.steps.clamp(max=last)
        optimizer.step(params, grads, schedule_lr[position],
                       None if schedule_cycled is None else schedule_cycled[position])
        population.steps += 1
        loss_sum += losses.detach() * len(yb)
        correct += (predict(logits.detach(), population.binary) == yb).sum(1)
        seen += len(yb)
    seen = max(1, seen)
    return [v / seen for v in loss_sum.tolist()], [v / seen for v in correct.tolist()]


def _evaluate(net: _StackedMLP, x: torch.Tensor, y: torch.Tensor, binary: bool,
              autocast: Callable) -> tuple[list[float], list[float]]:
    """Every member's mean loss and accuracy on (x, y), in eval mode (no dropout, BatchNorm's running statistics)."""
    k = net.params()[0].shape[0]
    chunk = max(128, min(4096, _EVAL_ROWS // k))
    loss_sum = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device, dtype=torch.long)
    with torch.no_grad(), autocast():
        for i in range(0, len(y), chunk):
            yb = y[i : i + chunk]
            logits = net.forward(x[i : i + chunk], False, None)
            loss_sum += loss_fn(logits, yb.expand(k, -1), binary, reduction="none").sum(1)
            correct += (predict(logits, binary) == yb).sum(1)
    n = max(1, len(y))
    return [v / n for v in loss_sum.tolist()], [v / n for v in correct.tolist()]


def _initial_state(cfg: TrialConfig, data: DataBundle) -> dict[str, torch.Tensor]:
    """The weights `train_trial` starts `cfg` from: its model built right after `torch.manual_seed(cfg.seed)`."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.input_shape, n_outputs(cfg, data.n_classes), base_dir=cfg.base_dir)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _schedule(cfg: TrialConfig, steps_per_epoch: int) -> list[tuple[float, float | None]]:
    """Per optimizer step: the lr multiplier and, for onecycle, the beta1 or momentum it cycles.

    Read from torch's own scheduler (`make_scheduler`) on a stand-in optimizer with lr 1, so
    every schedule train_trial offers is followed exactly; `lr` enters linearly in all of them.
    """
    t = cfg.train.model_copy(update={"lr": 1.0})
    stand_in = torch.zeros(1, requires_grad=True)
    optimizer = make_optimizer(cfg.train.optimizer, [stand_in], lr=1.0, momentum=cfg.train.momentum, weight_decay=0.0)
    scheduler = make_scheduler(t, optimizer, steps_per_epoch)
    group = optimizer.param_groups[0]
    total = t.epochs * steps_per_epoch
    out: list[tuple[float, float | None]] = []
    for s in range(total):
        cycled = None
        if t.schedule == "onecycle":
            cycled = group["betas"][0] if "betas" in group else group["momentum"]
        out.append((group["lr"], cycled))
        if s < total - 1:
            optimizer.step()  # no gradient: changes nothing, but keeps the scheduler's order check quiet
            scheduler.step()
    return out


def _batches_tracked(state: Mapping[str, torch.Tensor]) -> int:
    """BatchNorm's training-batch count in a member's state_dict (every norm layer counts alike)."""
    return next((int(v) for k, v in state.items() if k.endswith("num_batches_tracked")), 0)


def _to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it (in dicts and lists) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _shared(cfg: TrialConfig) -> dict[str, Any]:
    """The values every member of a population must share, by dotted path."""
    out = {k: v for k, v in cfg.flat().items() if k not in VARYING}
    out["train.optimizer"] = FAMILIES.get(cfg.train.optimizer, cfg.train.optimizer)
    out["data_seed"] = cfg.data_seed
    out["trainable"] = cfg.trainable
    return out


def _plain(value: Any, cfg: TrialConfig, key: str) -> str:
    return cfg.train.optimizer if key == "train.optimizer" else str(value)


def _per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`v` `(K,)` shaped to broadcast over the rows of `like` `(K, ...)`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _activate(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "leaky_relu":
        return F.leaky_relu(h, LEAKY_RELU_SLOPE)
    if name == "gelu":
        return F.gelu(h)
    if name == "tanh":
        return torch.tanh(h)
    if name == "sigmoid":
        return torch.sigmoid(h)
    raise AssertionError(f"unhandled activation {name!r}")  # the spec allows only these
