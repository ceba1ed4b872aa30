"""Tests for dlsearch.trial.population: K trials trained as one stacked model.

The contract checked here: each member's curve is the curve `train_trial` gives the same
config alone on the same batches (to float rounding), clipping, early stopping, divergence and
pruning act per member, and members that cannot share a population are refused with the key at
fault. Small MLPs on scikit-learn's digits, on the CPU, a few epochs each.
"""

from __future__ import annotations

import copy
from typing import Iterator, Mapping

import pytest
import torch

from dlsearch.config.trial_config import TrialConfig
from dlsearch.trial.models import build_model
from dlsearch.trial.population import (
    check_stackable,
    clip_grad_norm_per_member_,
    Answer,
    Population,
    Round,
    group_stackable,
    stack_problems,
    train_population,
)
from dlsearch.trial.train import TrialPruned, TrialResult, evaluate, train_trial
from tests.test_train import METRICS, curves, data_for, make_cfg

TOLERANCE = 1e-4  # on losses: members and lone trials differ only in float rounding


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: a second thread adds only synchronisation, and on a shared machine much of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_curve(member: TrialResult, alone: TrialResult, tolerance: float = TOLERANCE) -> None:
    assert (member.state, member.epochs_run, member.best_epoch) == (alone.state, alone.epochs_run, alone.best_epoch)
    for got, want in zip(curves(member.history), curves(alone.history), strict=True):
        for key in ("train_loss", "val_loss", "generalization_gap"):
            assert got[key] == pytest.approx(want[key], abs=tolerance), key
        for key in ("train_accuracy", "val_accuracy"):  # a sample whose top logits nearly tie may flip
            assert got[key] == pytest.approx(want[key], abs=0.01), key
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)


# ---------------------------------------------------------------- the same math as train_trial


@pytest.mark.parametrize("family, schedule", [("adam", "cosine"), ("adam", "onecycle"), ("sgd", "warmup_cosine")])
def test_each_member_trains_as_train_trial_trains_it_alone(family: str, schedule: str) -> None:
    # Same seed (so the same batches and init draws), different lr, weight decay, init and optimizer;
    # clipping on at a norm every member exceeds; the third member's lr is too small to improve, so
    # early stopping ends it at epoch 3 with its epoch-1 weights.
    common = ("model.depth=2", "model.dropout=0", "train.epochs=5", "train.grad_clip=0.5",
              f"train.schedule={schedule}", "train.early_stopping.patience=2")
    second = "train.optimizer=adamw" if family == "adam" else "train.optimizer=sgd"
    cfgs = [
        make_cfg(*common, f"train.optimizer={family}", "train.lr=0.01"),
        make_cfg(*common, second, "train.lr=0.003", "train.weight_decay=0.01", "train.momentum=0.5",
                 "model.init=orthogonal"),
        make_cfg(*common, f"train.optimizer={family}", "train.lr=1e-9", "train.weight_decay=1e-3",
                 "model.init=xavier_uniform"),
    ]
    data = data_for(cfgs[0])
    population = train_population(cfgs, data)
    assert population[2].epochs_run == 3 and population[2].best_epoch == 1
    for cfg, member in zip(cfgs, population):
        alone = train_trial(cfg, data)
        assert_same_curve(member, alone)
        assert member.test_loss == pytest.approx(alone.test_loss, abs=TOLERANCE)
        assert member.test_accuracy == pytest.approx(alone.test_accuracy, abs=0.01)
        assert member.best_state is not None and alone.best_state is not None
        assert member.best_state.keys() == alone.best_state.keys()
        for key, value in member.best_state.items():
            torch.testing.assert_close(value, alone.best_state[key], atol=1e-3, rtol=0, msg=key)


def test_members_with_layer_norm_and_their_own_seeds_train_as_they_would_alone() -> None:
    # Different seeds give different init draws; the batches are the population's (shuffle_seed).
    cfgs = [make_cfg("model.dropout=0", "model.norm=layer", "model.activation=gelu", "train.epochs=3",
                     f"train.lr={lr}", number=n) for n, lr in enumerate((0.01, 0.02, 0.005))]
    data = data_for(cfgs[0])
    population = train_population(cfgs, data, shuffle_seed=7)
    for cfg, member in zip(cfgs, population):
        assert_same_curve(member, train_population([cfg], data, shuffle_seed=7)[0])
    assert population[0].history[0]["val_loss"] != pytest.approx(population[1].history[0]["val_loss"])


def test_batch_norm_members_train_as_train_trial_trains_them() -> None:
    # SGD: with adam, the biases before batch norm (whose true gradient is 0) follow the sign of
    # rounding noise, so two runs agree only statistically; SGD leaves that noise as small as it is.
    cfgs = [make_cfg("model.norm=batch", "model.dropout=0", "train.epochs=3", "train.optimizer=sgd",
                     f"train.lr={lr}") for lr in (0.05, 0.1)]
    data = data_for(cfgs[0])
    for cfg, member in zip(cfgs, train_population(cfgs, data)):
        alone = train_trial(cfg, data)
        assert_same_curve(member, alone)
        for key in ("hidden.0.norm.running_mean", "hidden.0.norm.running_var", "hidden.0.norm.num_batches_tracked"):
            torch.testing.assert_close(member.best_state[key], alone.best_state[key], atol=1e-4, rtol=0)


def test_every_epoch_reports_each_member_with_the_trial_metrics() -> None:
    cfgs = [make_cfg("train.epochs=2", f"model.dropout={p}") for p in (0.0, 0.3)]
    calls: list[tuple[int, int]] = []

    def report(member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        calls.append((member, epoch))
        assert set(metrics) == METRICS

    results = train_population(cfgs, data_for(cfgs[0]), report)
    assert calls == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(r.state == "COMPLETE" and r.test_accuracy is not None and r.test_accuracy > 0.5 for r in results)


# ---------------------------------------------------------------- per member: clipping, divergence, pruning


def test_gradients_are_clipped_by_each_members_own_norm() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5), torch.randn(3, 4)]
    for g in grads:
        g[0] *= 1e-3  # under the threshold: untouched
        g[2] *= 1e3  # far over it: scaled alone
    expected = []
    for k in range(3):  # clip_grad_norm_ clips the .grad of what it is given
        member = [torch.zeros_like(g[k]) for g in grads]
        for p, g in zip(member, grads):
            p.grad = g[k].clone()
        norm = torch.nn.utils.clip_grad_norm_(member, 1.0)
        expected.append((norm, [p.grad for p in member]))
    norms = clip_grad_norm_per_member_(grads, 1.0)
    for k, (norm, member) in enumerate(expected):
        torch.testing.assert_close(norms[k], norm)
        for g, want in zip(grads, member):
            torch.testing.assert_close(g[k], want)
    assert torch.linalg.vector_norm(torch.cat([g[0].flatten() for g in grads])) < 0.1


def test_a_diverging_member_fails_alone() -> None:
    lrs = (0.05, 1e6, 0.1)
    cfgs = [make_cfg("train.optimizer=sgd", "train.grad_clip=0", "train.epochs=3", "model.dropout=0",
                     f"train.lr={lr}") for lr in lrs]
    data = data_for(cfgs[0])
    results = train_population(cfgs, data)
    assert results[1].state == "FAIL" and "diverged" in (results[1].fail_reason or "")
    assert "lr 1e+06" in (results[1].fail_reason or "") and results[1].test_loss is None
    without = train_population([cfgs[0], cfgs[2]], data)
    for member, reference in zip((results[0], results[2]), without):
        assert member.state == "COMPLETE"
        assert_same_curve(member, reference, tolerance=1e-6)


def test_pruning_a_member_stops_it_and_leaves_the_others_curves_unchanged() -> None:
    # Dropout on: each member's masks are drawn whatever the others do, so its curve is its own.
    cfgs = [make_cfg("train.epochs=4", f"train.lr={lr}", f"model.dropout={p}")
            for lr, p in ((0.01, 0.1), (0.02, 0.3), (0.005, 0.0))]
    data = data_for(cfgs[0])
    reference = train_population(cfgs, data)
    reported: list[tuple[int, int]] = []

    def prune_member_1_at_epoch_2(member: int, epoch: int, metrics: Mapping[str, float]) -> bool:
        reported.append((member, epoch))
        return not (member == 1 and epoch == 2)

    results = train_population(cfgs, data, prune_member_1_at_epoch_2)
    assert (results[1].state, results[1].epochs_run, len(results[1].history)) == ("PRUNED", 2, 2)
    assert results[1].test_loss is None and results[1].best_state is not None
    assert [e for m, e in reported if m == 1] == [1, 2]
    assert curves(results[1].history) == curves(reference[1].history[:2])
    for k in (0, 2):
        assert_same_curve(results[k], reference[k], tolerance=1e-6)


def test_a_report_that_raises_trial_pruned_prunes_that_member() -> None:
    cfgs = [make_cfg("train.epochs=3", f"train.lr={lr}") for lr in (0.01, 0.02)]

    def report(member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if member == 0:
            raise TrialPruned()

    results = train_population(cfgs, data_for(cfgs[0]), report)
    assert [(r.state, r.epochs_run) for r in results] == [("PRUNED", 1), ("COMPLETE", 3)]


def test_a_round_report_sees_every_training_member_and_stops_those_it_returns() -> None:
    cfgs = [make_cfg("train.epochs=3", f"train.lr={lr}") for lr in (0.01, 0.02, 0.005)]
    seen: list[tuple[int, list[int], list[int]]] = []

    def on_round(round_: Round) -> Answer:
        seen.append((round_.index, sorted(round_.metrics), sorted(round_.ended)))
        assert all(set(m) >= set(METRICS) for m in round_.metrics.values())
        return Answer(stop=[2] if round_.index == 1 else [])

    results = train_population(cfgs, data_for(cfgs[0]), on_round=on_round)
    assert seen == [(1, [0, 1, 2], []), (2, [0, 1], []), (3, [0, 1], [0, 1])]
    assert [(r.state, r.epochs_run) for r in results] == [("COMPLETE", 3), ("COMPLETE", 3), ("PRUNED", 1)]


# ---------------------------------------------------------------- refill and resume


def test_a_newcomer_starts_at_epoch_1_with_fresh_weights_and_optimizer_beside_older_members() -> None:
    """Member 1 joins at round 2 while member 0 is at its epoch 2: its curve is the one it gets
    alone from a fresh start on the same batches (the population's second shuffle), its schedule
    from the start; member 0 goes on as if alone; each ends at its own epochs."""
    common = ("train.epochs=3", "model.dropout=0", "train.schedule=cosine", "train.grad_clip=0.5")
    old, new = make_cfg(*common, "train.lr=0.01"), make_cfg(*common, "train.lr=0.003", "model.init=orthogonal",
                                                             number=1)
    data = data_for(old)
    rounds: list[Round] = []

    def on_round(round_: Round) -> Answer:
        rounds.append(round_)
        return Answer(add=[new] if round_.index == 1 else [])

    results = train_population([old], data, shuffle_seed=7, on_round=on_round)
    assert [r.epochs for r in rounds] == [{0: 1}, {0: 2, 1: 1}, {0: 3, 1: 2}, {1: 3}]
    assert [sorted(r.ended) for r in rounds] == [[], [], [0], [1]]
    assert_same_curve(results[0], train_population([old], data, shuffle_seed=7)[0], tolerance=1e-6)
    alone = Population([new], data, shuffle_seed=7)
    torch.randperm(len(data.y_train), generator=alone.shuffle)  # the round it did not train in
    while alone.training:
        alone.run_round()
    assert_same_curve(results[1], alone.results()[0], tolerance=1e-6)
    assert results[1].history[0]["lr"] == pytest.approx(0.003)  # the schedule's start: epoch 1's lr


def test_a_newcomer_takes_a_pruned_members_slot_and_the_others_are_unchanged() -> None:
    # Dropout on: masks follow the slot, so member 0's curve does not depend on the swap.
    cfgs = [make_cfg("train.epochs=3", f"train.lr={lr}", "model.dropout=0.2") for lr in (0.01, 0.02)]
    newcomer = make_cfg("train.epochs=3", "train.lr=0.005", "model.dropout=0.3", number=2)
    data = data_for(cfgs[0])
    reference = train_population(cfgs, data)

    def on_round(round_: Round) -> Answer | None:
        return Answer(stop=[1], add=[newcomer]) if round_.index == 1 else None

    results = train_population(cfgs, data, on_round=on_round)
    assert [(r.state, r.epochs_run) for r in results] == [("COMPLETE", 3), ("PRUNED", 1), ("COMPLETE", 3)]
    assert_same_curve(results[0], reference[0], tolerance=1e-6)


def test_a_restored_population_trains_on_as_if_never_stopped() -> None:
    cfgs = [make_cfg("train.epochs=4", f"train.lr={lr}", "model.dropout=0.2", "train.schedule=onecycle")
            for lr in (0.01, 0.003)]
    newcomer = make_cfg("train.epochs=4", "train.lr=0.02", "model.dropout=0.1", "train.schedule=onecycle", number=2)
    data = data_for(cfgs[0])
    saved: list[dict] = []

    def on_round(round_: Round) -> Answer | None:
        if round_.index == 2:
            saved.append(copy.deepcopy(round_.state()))
            return Answer(add=[newcomer])
        return None

    straight = train_population(cfgs, data, on_round=on_round)
    restored = Population.restore(saved[0], data)
    assert restored.round == 2 and [m.epoch for m in restored.members.values()] == [2, 2]
    restored.add([newcomer])
    while restored.training:
        restored.run_round()
    again = {i: r for i, r in zip(sorted(restored.members), restored.results())}
    for i in (0, 1, 2):
        assert curves(again[i].history) == curves(straight[i].history), i
        assert again[i].best_epoch == straight[i].best_epoch


def test_a_members_best_weights_load_into_its_own_model() -> None:
    cfgs = [make_cfg("train.epochs=2", f"train.lr={lr}") for lr in (0.01, 0.003)]
    data = data_for(cfgs[0])
    for cfg, result in zip(cfgs, train_population(cfgs, data)):
        model = build_model(cfg.model, data.input_shape, data.n_classes)
        model.load_state_dict(result.best_state)
        assert evaluate(model, data.x_test, data.y_test) == pytest.approx((result.test_loss, result.test_accuracy),
                                                                          abs=1e-5)


# ---------------------------------------------------------------- what may and may not be stacked


def test_grouping_puts_configs_that_share_their_shapes_together() -> None:
    cfgs: list[TrialConfig] = [
        make_cfg("model.width=32", "train.lr=0.01"),
        make_cfg("model.width=64"),
        make_cfg("model.width=32", "train.optimizer=adamw", "model.dropout=0.3", "model.init=orthogonal", number=5),
        make_cfg("model.width=32", "train.optimizer=sgd"),
        make_cfg("model.kind=cnn", "model.width=32"),
        make_cfg("model.width=64", "train.weight_decay=0.1"),
        make_cfg("model.width=32", "train.optimizer=sgd", "train.momentum=0.5"),
    ]
    assert group_stackable(cfgs) == [[0, 2], [1, 5], [3, 6], [4]]


def test_members_that_differ_in_a_shared_key_are_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"population: members differ in model\.width \(32 vs 64\)"):
        train_population([make_cfg("model.width=32"), make_cfg("model.width=64")], data_for(make_cfg()))
    with pytest.raises(ValueError) as err:
        check_stackable([make_cfg(), make_cfg("train.epochs=3", "train.optimizer=sgd", "train.batch_size=32")])
    message = str(err.value)
    assert "train.epochs (2 vs 3)" in message and "train.batch_size (64 vs 32)" in message
    assert "train.optimizer (adam vs sgd); sgd cannot share a population with adam or adamw" in message


def test_configs_no_population_can_train_are_refused_naming_the_key() -> None:
    assert stack_problems(make_cfg()) == []
    assert stack_problems(make_cfg("model.kind=cnn"))[0].startswith("model.kind: populations stack mlp models only")
    assert stack_problems(make_cfg("train.optimizer=rmsprop"))[0].startswith("train.optimizer: must be one of")
    with pytest.raises(ValueError, match=r"population: member 0: model\.kind: .*\(got cnn\)"):
        check_stackable([make_cfg("model.kind=cnn")])
    with pytest.raises(ValueError, match="at least one member"):
        train_population([], data_for(make_cfg()))


def test_a_population_saved_with_no_member_training_restores_and_takes_newcomers() -> None:
    cfg = make_cfg("train.epochs=1", "train.lr=0.01")
    data = data_for(cfg)
    population = Population([cfg], data)
    round_ = population.run_round()
    assert list(round_.ended) == [0] and not population.training
    restored = Population.restore(copy.deepcopy(round_.state()), data)
    assert not restored.training and restored.round == 1
    assert restored.add([make_cfg("train.epochs=1", "train.lr=0.003", number=1)]) == [1]
    restored.run_round()
    [result] = restored.results()
    assert (result.state, result.epochs_run) == ("COMPLETE", 1)
