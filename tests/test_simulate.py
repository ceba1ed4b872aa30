"""The simulated backend (dlsearch/tuner/simulate.py): the real driver on scripted curves and a simulated clock."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dlsearch.config.spec import spec_from_dict
from dlsearch.tracking.null import NullTracker
from dlsearch.tuner.simulate import RecordedCurve, simulate_study


def _spec(**sections: Any):
    raw = {
        "name": "simulated",
        "seed": 3,
        "data": {"dataset": "synthetic"},
        "train": {"epochs": 4},
        "search": {"train.lr": {"type": "float", "low": 0.01, "high": 1.0}},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "budget": {"trials": 4},
        "tracking": {"register_best": False},
    }
    return spec_from_dict({**raw, **sections})


def _curve(lr: float, epoch_s: float = 1.0) -> RecordedCurve:
    """val_accuracy rises with the epoch and with lr; each epoch takes `epoch_s`."""
    return RecordedCurve([{"val_accuracy": lr * e, "val_loss": 1 - lr} for e in range(1, 5)], [epoch_s] * 4)


def test_every_trial_completes_with_its_best_epoch_and_the_clock_adds_epoch_times() -> None:
    sim = simulate_study(_spec(), lambda p: _curve(p["train.lr"]), n_workers=1)
    trials = sim.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for t in trials:
        assert t.value == pytest.approx(4 * t.params["train.lr"])  # the best epoch is the last
        assert t.intermediate_values == {e: pytest.approx(e * t.params["train.lr"]) for e in range(1, 5)}
        assert t.user_attrs["epochs_run"] == 4
    assert sim.epochs_run == 16 and sim.time_s == pytest.approx(16.0)  # one worker: one epoch after another
    assert [e.epochs_run for e in sim.epochs] == list(range(1, 17))
    assert [(e.state, e.number) for e in sim.ends] == [("COMPLETE", n) for n in range(4)]


def test_trials_on_several_workers_finish_out_of_order_by_their_epoch_times() -> None:
    # Trial 0's epochs take 10 s, the others' 1 s: on 2 workers, trials 1, 2 and 3 finish before 0.
    slow = {0: 10.0}
    numbers = iter(range(100))

    def curve_of(params: dict[str, Any]) -> RecordedCurve:
        return _curve(params["train.lr"], slow.get(next(numbers), 1.0))

    sim = simulate_study(_spec(), curve_of, n_workers=2)
    assert [e.number for e in sim.ends] == [1, 2, 3, 0]
    assert sim.time_s == pytest.approx(40.0)
    assert [e.time_s for e in sim.ends if e.number == 3] == [pytest.approx(12.0)]  # after 1 and 2, on worker 1


def test_the_pruner_prunes_through_the_driver_and_optuna_records_pruned() -> None:
    # The first trial's curve is the best; the median pruner stops every later, worse one at epoch 1.
    values = iter([1.0, 0.1, 0.2, 0.3])

    def curve_of(params: dict[str, Any]) -> RecordedCurve:
        return _curve(next(values))

    spec = _spec(pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    sim = simulate_study(spec, curve_of, n_workers=1)
    states = [t.state for t in sim.study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE] + [TrialState.PRUNED] * 3
    assert [e.state for e in sim.ends] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert sim.epochs_run == 4 + 3  # the pruned ones ran one epoch each


def test_an_epoch_budget_stops_the_study_and_closes_running_trials_as_interrupted() -> None:
    sim = simulate_study(_spec(), lambda p: _curve(p["train.lr"]), n_workers=3, max_epochs=5)
    assert sim.epochs_run == 5 and sim.n_interrupted == 3
    failed = sim.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert {t.user_attrs["fail_reason"] for t in failed} == {"interrupted"}


def test_with_an_epoch_budget_trials_are_asked_until_it_is_spent() -> None:
    sim = simulate_study(_spec(), lambda p: _curve(p["train.lr"]), n_workers=2, max_epochs=30)
    # Two workers in step: trials end in pairs at epochs 8, 16 and 24; the 7th and 8th stop at 3 epochs each.
    assert sim.epochs_run == 30 and sim.n_interrupted == 2
    assert sum(e.state == "COMPLETE" for e in sim.ends) == 6  # more than budget.trials (4): epochs count


def test_a_simulated_time_limit_stops_the_study() -> None:
    sim = simulate_study(_spec(), lambda p: _curve(p["train.lr"]), n_workers=1, max_time_s=6.5)
    assert sim.epochs_run == 6 and sim.time_s == pytest.approx(6.5)


def test_a_non_finite_objective_fails_the_trial_with_its_reason() -> None:
    def curve_of(params: dict[str, Any]) -> RecordedCurve:
        return RecordedCurve([{"val_accuracy": 0.5}, {"val_accuracy": math.nan}], [1.0, 1.0])

    sim = simulate_study(_spec(budget={"trials": 1}), curve_of, n_workers=1)
    (trial,) = sim.study.get_trials(deepcopy=False)
    assert trial.state == TrialState.FAIL
    assert "val_accuracy became nan at epoch 2" in trial.user_attrs["fail_reason"]


def test_a_study_given_replaces_the_specs_sampler_and_the_tracker_gets_the_runs() -> None:
    class Recording(NullTracker):
        def __init__(self) -> None:
            self.ended: list[str] = []

        def end(self, run_id: str, state: str, **kwargs: Any) -> None:
            self.ended.append(state)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    tracker = Recording()
    sim = simulate_study(_spec(), lambda p: _curve(p["train.lr"]), 2, study=study, tracker=tracker)
    assert sim.study is study and len(study.trials) == 4
    assert tracker.ended == ["COMPLETE"] * 4


def test_bad_arguments_name_what_must_hold() -> None:
    with pytest.raises(ValueError, match=r"n_workers: must be >= 1 \(got 0\)"):
        simulate_study(_spec(), lambda p: _curve(0.5), n_workers=0)
    with pytest.raises(ValueError, match=r"max_epochs: must be >= 1 \(got 0\)"):
        simulate_study(_spec(), lambda p: _curve(0.5), n_workers=1, max_epochs=0)
    with pytest.raises(ValueError, match=r"len\(metrics\) == len\(epoch_time_s\)"):
        RecordedCurve([{"val_accuracy": 1.0}], [1.0, 2.0])


# ---------------------------------------------------------------- dlsearch simulate

_REPLAY = '''
import math


def replay(config, report):
    """A recorded curve per lr: rises with the epoch, best near lr = 0.03; 30 s an epoch."""
    lr = config["lr"]
    for epoch in range(1, config["train"]["epochs"] + 1):
        report(epoch, {"val_accuracy": (1 - math.exp(-epoch * lr * 10)) / (1 + abs(math.log10(lr) + 1.5)),
                       "epoch_time_s": 30.0})
'''


def test_simulate_command_replays_a_trainable_on_the_simulated_clock_and_writes_nothing(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from dlsearch.cli.commands import main

    (tmp_path / "curves.py").write_text(_REPLAY)
    (tmp_path / "study.yaml").write_text(
        "name: sim-cli\ntrainable: curves:replay\ntrain: {epochs: 10}\n"
        "search:\n  lr: {type: float, low: 0.0001, high: 1.0, log: true}\n"
        "objective: {metric: val_accuracy, direction: maximize}\nbudget: {trials: 12}\n")
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["simulate", "study.yaml", "--workers", "3", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["trials"] == 12 and result["complete"] + result["pruned"] + result["failed"] == 12
    assert result["pruned"] >= 1  # the default pruner (asha) acted on the replayed curves
    assert result["epochs_run"] < 12 * 10
    # Each epoch takes the 30 s the curve says; 3 workers share the epochs run.
    assert result["epochs_run"] * 30 / 3 <= result["simulated_s"] <= result["epochs_run"] * 30
    seen = result["best_seen_at_share_of_epochs"]
    assert seen["25%"] <= seen["50%"] <= seen["100%"] and result["best_value"] <= seen["100%"]
    assert {p.name for p in tmp_path.iterdir()} <= {"__pycache__", "curves.py", "study.yaml"}  # nothing written

    plain = CliRunner().invoke(main, ["simulate", "study.yaml", "--set", "pruner.type=none", "--workers", "1"])
    assert plain.exit_code == 0, plain.output
    assert "12 trials on 1 simulated worker (12 complete, 0 pruned, 0 failed), 120 epochs in 1:00:00" in plain.output


def test_simulate_refuses_a_study_without_a_trainable_in_one_line(tmp_path) -> None:
    from click.testing import CliRunner

    from dlsearch.cli.commands import main

    study = tmp_path / "study.yaml"
    study.write_text("name: builtin\ndata: {dataset: digits}\n"
                     "search:\n  train.lr: {type: float, low: 0.0001, high: 1.0, log: true}\n"
                     "objective: {metric: val_accuracy, direction: maximize}\n")
    out = CliRunner().invoke(main, ["simulate", str(study)])
    assert out.exit_code == 2
    assert out.output.strip().count("\n") == 0 and "trainable" in out.output and "Traceback" not in out.output
