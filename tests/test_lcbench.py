"""The LCBench surrogate read with onnxruntime (bench/lcbench_surrogate.py) and its benchmark (bench/lcbench.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the LCBench surrogate needs onnxruntime (pip install onnxruntime)")

from bench.lcbench_surrogate import N_EPOCHS, LazyCurve, Surrogate, data_folder, replay, study_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (data_folder() / "model.onnx").is_file(),
                                reason=f"no LCBench surrogate in {data_folder()}")

# What YAHPO Gym 1.0.2 itself returns (BenchmarkSet("lcbench").objective_function, in a separate
# environment): the README's example first, then random configurations.
YAHPO = [
    ("3945", 10, {"batch_size": 64, "learning_rate": 0.01, "max_dropout": 0.2, "max_units": 256, "momentum": 0.9,
                  "num_layers": 2, "weight_decay": 1e-4}, 57.76887512207031, 84.42225646972656),
    ("168331", 25, {"batch_size": 404, "learning_rate": 0.04685239138182074, "max_dropout": 0.04048437818077755,
                    "max_units": 587, "momentum": 0.5324756499409032, "num_layers": 3,
                    "weight_decay": 0.09678032149206794}, 259.5627136230469, 35.21915817260742),
    ("34539", 38, {"batch_size": 472, "learning_rate": 0.053007662767791335, "max_dropout": 0.5046868558173903,
                   "max_units": 352, "momentum": 0.2243737486203442, "num_layers": 1,
                   "weight_decay": 0.06184071597756642}, 74.0005111694336, 59.09596252441406),
]


@pytest.fixture(scope="module")
def surrogate() -> Surrogate:
    return Surrogate()


def test_the_surrogate_gives_yahpo_gyms_values(surrogate: Surrogate) -> None:
    for task, epoch, config, time_s, accuracy in YAHPO:
        out = surrogate.curves(task, [config], [epoch])
        assert out["time"][0, 0] == pytest.approx(time_s, abs=1e-3)
        assert out["val_accuracy"][0, 0] == pytest.approx(accuracy, abs=1e-3)


def test_tasks_and_space_come_from_the_config_space(surrogate: Surrogate) -> None:
    assert len(surrogate.tasks) == 34 and surrogate.tasks[:3] == ("3945", "7593", "34539")
    bs = surrogate.space["batch_size"]
    assert (bs.low, bs.high, bs.log, bs.integer) == (16, 512, True, True)
    assert not surrogate.space["weight_decay"].log
    configs = surrogate.sample(200, np.random.default_rng(0))
    for name, dim in surrogate.space.items():
        values = [c[name] for c in configs]
        assert dim.low <= min(values) and max(values) <= dim.high
        if dim.integer:
            assert all(v == int(v) for v in values)


def test_one_batched_call_gives_the_whole_curve_and_the_lazy_curve_agrees(surrogate: Surrogate) -> None:
    task, _, config, _, _ = YAHPO[0]
    whole = surrogate.curves(task, [config])
    assert whole["val_accuracy"].shape == (1, N_EPOCHS)
    assert np.all(np.diff(whole["time"][0]) > -1.0)  # cumulative seconds (its noise aside)
    lazy = LazyCurve(surrogate, task, config)
    assert lazy.at(1)[0]["val_accuracy"] == pytest.approx(whole["val_accuracy"][0, 0], abs=1e-4)
    assert lazy.n_rows == 1  # a trial pruned at epoch 1 costs one row
    accuracy = [lazy.at(e)[0]["val_accuracy"] for e in range(1, N_EPOCHS + 1)]
    assert accuracy == pytest.approx(list(whole["val_accuracy"][0]), abs=1e-4)
    assert lazy.n_rows == N_EPOCHS
    assert sum(lazy.at(e)[1] for e in range(1, N_EPOCHS + 1)) == pytest.approx(whole["time"][0, -1], rel=1e-3)
    with pytest.raises(IndexError, match=r"`1 <= epoch <= 52` must hold"):
        lazy.at(53)


def test_the_study_file_validates_and_its_trainable_replays_the_curve(surrogate: Surrogate) -> None:
    from dlsearch.config.spec import spec_from_dict
    from dlsearch.config.trial_config import trial_config

    spec = spec_from_dict(study_dict("3945", surrogate), base_dir=REPO)
    assert sorted(spec.search) == sorted(f"model.{p}" for p in surrogate.space)
    _, _, config, _, accuracy = YAHPO[0]
    cfg = trial_config(spec, {f"model.{k}": v for k, v in config.items()}, 0)
    reported: list[tuple[int, dict]] = []
    replay(cfg.to_dict(), lambda epoch, metrics: reported.append((epoch, metrics)))
    assert [e for e, _ in reported] == list(range(1, N_EPOCHS + 1))
    assert reported[9][1]["val_accuracy"] == pytest.approx(accuracy, abs=1e-3)


def test_the_one_epoch_baseline_retrains_the_best_first_epochs(surrogate: Surrogate) -> None:
    from bench import lcbench

    method = next(m for m in lcbench.METHODS if m.custom == "one_epoch")
    sim = lcbench.run_study(method, "3945", 0, 1, surrogate)  # one worker: every first epoch is in
    n_first = lcbench.BUDGET_EPOCHS - N_EPOCHS * method.top_k
    trials = sim.study.get_trials(deepcopy=False)
    first = sorted((t for t in trials if t.number < n_first), key=lambda t: -t.intermediate_values[1])
    retrained = [t for t in trials if t.number >= n_first]
    assert len(retrained) == method.top_k and all(len(t.intermediate_values) == N_EPOCHS for t in retrained)
    assert [t.params for t in retrained] == [t.params for t in first[:method.top_k]]
    assert sim.epochs_run == lcbench.BUDGET_EPOCHS


@pytest.mark.slow
def test_quick_benchmark_runs_and_prints_regret() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "lcbench", "--quick", "--no-write"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import re

    assert re.search(r"lcbench: \d+ studies \(2 tasks x 1 seeds x \d+ methods x 3 concurrencies\)", proc.stdout), \
        proc.stdout
    assert "dlsearch default:" in proc.stdout and "tpe+median:" in proc.stdout, proc.stdout
    assert "wrote " not in proc.stdout
