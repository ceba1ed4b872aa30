"""`resources.population` end to end: trials that share their shapes train as one stacked model
in one Tune trial, and each stays its own Optuna trial and MLflow child run, pruned on its own.
The population stays full: a member that is pruned or ends frees its slot for a newly asked
trial, which starts at its epoch 1 beside the others; a worker killed mid-population resumes
every member where it was.

Small digits studies through real Ray Tune, Optuna storage and MLflow; the wide learning-rate
range makes some members worse than the median, so the pruner stops them mid-population.
What the worker trained, round by round, is read from Tune's own record of the trial's results
(`result.json`: every report, with the worker's pid), not from the driver, which skips repeats.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.protocol import PopulationEpoch, TrialEnd
from dlsearch.trial.population import FAMILIES, VARYING
from dlsearch.tuner.runner import run_study
from dlsearch.config.spec import load_spec
from tests.studies import write_study

pytestmark = pytest.mark.slow

N_TRIALS, K, EPOCHS = 16, 4, 5
# adam and adamw share a population: every trial asked for a free slot stacks with the others.
SEARCH = {
    "train.lr": {"type": "float", "low": 1.0e-5, "high": 0.3, "log": True},
    "train.optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
    "model.width": {"type": "categorical", "choices": [16, 32, 64]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.3},
}


def tune_rows(folder: Path) -> dict[str, list[tuple[int, PopulationEpoch]]]:
    """Every round each Tune trial of the study reported, in order: (worker pid, the round)."""
    names = {"PopulationEpoch": PopulationEpoch, "TrialEnd": TrialEnd, "nan": math.nan, "inf": math.inf}
    out: dict[str, list[tuple[int, PopulationEpoch]]] = {}
    for path in sorted((folder / "ray").glob("*/run_trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rounds = [(r["pid"], eval(r["dlsearch"], {"__builtins__": {}}, names)) for r in rows  # noqa: S307 - our repr
                  if str(r.get("dlsearch", "")).startswith("PopulationEpoch(")]
        out[path.parent.name] = rounds
    return out


def _kill_the_worker_when(condition: Any) -> tuple[list[int], Any]:
    """An on_event hook that SIGKILLs the trials' Ray worker processes (as tests/test_faults.py
    does) at the first epoch event `condition(info)` holds for."""
    killed: list[int] = []

    def on_event(kind: str, info: dict) -> None:
        if kind == "epoch" and not killed and condition(info):
            pids = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))

    return killed, on_event


@pytest.fixture(scope="module")
def population_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study, list[tuple[str, dict]]]:
    """One study for every test here: N_TRIALS trials in populations of K, one population at a time,
    pruned by the median; the worker is killed once, when a newcomer reports its epoch 2, and
    Tune retries it from its last checkpoint."""
    folder = tmp_path_factory.mktemp("population")
    path = write_study(folder, budget={"trials": N_TRIALS}, search=SEARCH,
                       train={"epochs": EPOCHS, "checkpoint_every": 1},
                       resources={"population": K, "max_concurrent": 1, "max_failures": 2})
    events: list[tuple[str, dict]] = []
    killed, kill = _kill_the_worker_when(lambda info: info["number"] >= K and info["epoch"] == 2)

    def on_event(kind: str, info: dict) -> None:
        events.append((kind, dict(info)))
        kill(kind, info)

    run_study(load_spec(path), on_event=on_event)
    assert killed, "a worker process was killed"
    study = optuna.load_study(study_name="e2e-digits", storage=f"sqlite:///{folder}/optuna.db")
    return folder, study, events


def test_members_share_their_shapes_and_each_is_its_own_optuna_trial(population_study) -> None:
    _, study, _ = population_study
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == N_TRIALS and all(t.state.is_finished() for t in trials)
    populations = {tuple(t.user_attrs["population"]) for t in trials if "population" in t.user_attrs}
    assert populations, "no trials trained as a population"
    assert max(len(p) for p in populations) > 1 and all(len(p) <= K for p in populations)
    by_number = {t.number: t for t in trials}
    for members in populations:
        shared = [{k: v for k, v in by_number[n].params.items() if k not in VARYING} for n in members]
        assert all(s == shared[0] for s in shared), shared  # width and the like: one stacked model
        families = {FAMILIES[by_number[n].params["train.optimizer"]] for n in members}
        assert len(families) == 1  # adam and sgd keep different optimizer state: never one population


def test_pruning_acts_on_each_member(population_study) -> None:
    _, study, _ = population_study
    members = [t for t in study.get_trials(deepcopy=False) if len(t.user_attrs.get("population", [])) > 1]
    pruned = [t for t in members if t.state == TrialState.PRUNED]
    complete = [t for t in members if t.state == TrialState.COMPLETE]
    assert pruned and complete, [(t.number, t.state.name) for t in members]
    for t in pruned:  # it trained no further than the epoch it was pruned at
        assert t.user_attrs["epochs_run"] == max(t.intermediate_values) <= EPOCHS
    assert any(t.user_attrs["epochs_run"] < EPOCHS for t in pruned)
    assert any(t.user_attrs["epochs_run"] == EPOCHS for t in complete)


def test_each_member_has_a_child_run_with_its_curve_and_checkpoint(population_study) -> None:
    folder, study, _ = population_study
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e-digits").experiment_id],
                              "tags.`dlsearch.trial_number` != ''")
    by_number = {int(r.data.tags["dlsearch.trial_number"]): r for r in runs}
    assert sorted(by_number) == list(range(N_TRIALS))
    for t in study.get_trials(deepcopy=False):
        run = by_number[t.number]
        assert run.data.tags["dlsearch.state"] == t.state.name
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(curve) == t.user_attrs["epochs_run"]
        members = t.user_attrs.get("population")
        assert run.data.tags.get("dlsearch.population") == (",".join(map(str, members)) if members else None)
        if t.state == TrialState.COMPLETE:
            assert max(p.value for p in curve) == pytest.approx(t.value)
            files = [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")]
            assert files == ["checkpoint/best.pt"]
            assert run.data.metrics["test_accuracy"] == pytest.approx(t.user_attrs["test_accuracy"])


def test_a_members_checkpoint_holds_its_own_best_weights(population_study) -> None:
    """The registered best trial's weights are its own row of the stacked model: evaluated alone,
    they give the validation accuracy its curve reached."""
    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.data import load_data
    from dlsearch.trial.models import build_model
    from dlsearch.trial.train import evaluate

    folder, study, _ = population_study
    best = study.best_trial
    if len(best.user_attrs.get("population", [])) < 2:
        best = max((t for t in study.trials if t.state == TrialState.COMPLETE and len(t.user_attrs.get("population", [])) > 1),
                   key=lambda t: t.value)
    spec = load_spec(folder / "study.yaml")
    cfg = trial_config(spec, best.params, best.number)
    data = load_data(cfg.data, cfg.data_seed)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    model.load_state_dict(torch.load(best.user_attrs["checkpoint"], map_location="cpu"))
    _, accuracy = evaluate(model, data.x_val, data.y_val)
    assert accuracy == pytest.approx(best.value, abs=1e-6)


def test_progress_names_every_member(population_study) -> None:
    _, _, events = population_study
    started = [info["number"] for kind, info in events if kind == "trial_start"]
    ended = [info["number"] for kind, info in events if kind == "trial_end"]
    assert sorted(started) == sorted(ended) == list(range(N_TRIALS))


def test_freed_slots_are_refilled_with_newcomers_that_start_at_epoch_1(population_study) -> None:
    folder, study, _ = population_study
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    tune_trials = tune_rows(folder)
    assert len(trials) == N_TRIALS and len(tune_trials) < N_TRIALS  # several Optuna trials per Tune trial
    newcomers = 0
    for rows in tune_trials.values():
        # A round the killed worker reported and its successor trained again counts once.
        rounds = sorted({r.round: (pid, r) for pid, r in rows}.values(), key=lambda row: row[1].round)
        first_round: dict[int, int] = {}
        for _, r in rounds:
            for number, epoch in r.epochs.items():
                first_round.setdefault(number, r.round)
        start = min(first_round.values(), default=1)
        for number, joined in first_round.items():
            mine = [r.epochs[number] for _, r in rounds if number in r.epochs]
            assert mine == list(range(1, len(mine) + 1)), (number, mine)  # from epoch 1, one epoch a round
            assert sorted(trials[number].intermediate_values) == mine
            newcomers += joined > start
        # The population stays full while the budget has trials to ask: K members in every round
        # before the last newcomer's first one.
        last_join = max(first_round.values(), default=1)
        assert all(len(r.members) == K for _, r in rounds if r.round < last_join), [len(r.members) for _, r in rounds]
    assert newcomers >= N_TRIALS - len(tune_trials) * K  # every trial past the first members came in as one


def test_a_killed_worker_resumes_every_member_at_its_epoch(population_study) -> None:
    """The restarted worker goes on from the last checkpoint Tune took, every member (newcomers
    included) at its own epoch: no round before that checkpoint is trained again, and the round
    the kill interrupted trains again exactly as the driver first saw it."""
    folder, study, _ = population_study
    rows = [rounds for rounds in tune_rows(folder).values() if len({pid for pid, _ in rounds}) > 1]
    assert len(rows) == 1, "one population went on in a new worker"
    (rounds,) = rows
    before = [r for pid, r in rounds if pid == rounds[0][0]]
    after = [r for pid, r in rounds if pid != rounds[0][0]]
    assert [r.round for r in before] == list(range(1, len(before) + 1))
    resumed = after[0].round
    assert before[-1].round <= resumed <= before[-1].round + 1 and resumed > 1
    assert [r.round for r in after] == list(range(resumed, resumed + len(after)))
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, epoch in after[0].epochs.items():
        trained_before = sum(1 for r in before if r.round < resumed and number in r.epochs)
        assert epoch == trained_before + 1, (number, epoch, trained_before)  # where it was, not from scratch
        history = client.get_metric_history(trials[number].user_attrs["mlflow_run_id"], "val_loss")
        logged = [m.value for m in history if m.step == epoch]
        assert logged == [pytest.approx(after[0].members[number]["val_loss"], abs=1e-6)]
    assert all(t.state.is_finished() and t.state != TrialState.FAIL for t in trials.values())
