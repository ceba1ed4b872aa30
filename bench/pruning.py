"""How much training does pruning save on MNIST, and what does it cost in the best result?

Goal: `pruner: hyperband` trains at least 4x fewer epochs than `pruner: none` on the same study,
with a best val_accuracy within 0.3 percentage points of it.

The same study (studies/mnist.yaml with a smaller budget, the same seed) runs once per pruner:
`none`, the study's own `median` (n_startup_trials 5, n_warmup_steps 2) and `hyperband` (Optuna's
defaults: min_resource 1, max_resource from the first finished trial, reduction factor 3).
Every run has its own temporary folder for every store, and all share one Ray session started
before them (and, outside --quick, an untimed warm-up of the workers: `bench.warm_up_workers`),
so no run pays for Ray's start-up. --quick runs `none` and `hyperband` only, on a tiny budget. A run's epochs are those its trials reported (`StudySummary.epochs_run`);
its training time is the sum of those epochs' `epoch_time_s`; its wall time is `run_study`'s, from
the call to the return (including the leaderboard and plots; `register_best` is off, as the model
registry is no part of pruning).

Trials run two at a time (the study's `max_concurrent: auto` on two CPUs), so which trials the
TPE sampler proposes after its random start-up trials depends on what finished first and on
what pruning reported: the table says how many trials sampled the same parameters as the
`none` run's trial with the same number.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from bench import REPO, load_1min, machine, ray_session, store_overrides, versions, warm_up_workers

HEADING = "## Pruning: epochs saved by hyperband and median vs no pruning on MNIST (`bench/pruning.py`)"
GOAL_EPOCH_RATIO = 4.0  # epochs without pruning / epochs with hyperband
GOAL_ACCURACY_PP = 0.3  # the most hyperband's best val_accuracy may fall below no pruning's, in points
STUDY = "studies/mnist.yaml"
PRUNERS = {
    "none": "pruner={type: none}",
    "median": None,  # the study file's own pruner
    "hyperband": "pruner={type: hyperband}",
}


def overrides(quick: bool) -> list[str]:
    if quick:
        return ["budget.trials=3", "train.epochs=3", "data.subset=2000", "tracking.register_best=false"]
    return ["budget.trials=12", "train.epochs=6", "data.subset=20000", "tracking.register_best=false"]


def run(quick: bool = False) -> dict[str, Any]:
    """One study per pruner, in the order of PRUNERS (quick: none and hyperband only)."""
    from dlsearch.config.spec import load_spec

    chosen = ("none", "hyperband") if quick else tuple(PRUNERS)
    base = overrides(quick)
    runs: dict[str, dict[str, Any]] = {}
    with ray_session() as ray_start_s:
        spec = load_spec(REPO / STUDY, base)
        warm_up_s = 0.0 if quick else warm_up_workers(spec.data, spec.seed, 2)
        for pruner in chosen:
            with tempfile.TemporaryDirectory(prefix=f"bench-pruning-{pruner}-") as tmp:
                extra = [PRUNERS[pruner]] if PRUNERS[pruner] else []
                runs[pruner] = _run_one([*base, *extra, *store_overrides(Path(tmp))])
    reference = runs["none"]
    for r in runs.values():
        r["epoch_ratio"] = reference["epochs"] / r["epochs"]
        r["vs_none_pp"] = 100 * (r["best_val_accuracy"] - reference["best_val_accuracy"])
        r["best_drop_pp"] = max(0.0, -r["vs_none_pp"])  # how far below no pruning's best (0 when above)
        r["same_params_as_none"] = sum(
            1 for number, params in r["params"].items() if reference["params"].get(number) == params)
    hb = runs["hyperband"]
    epochs = load_spec(REPO / STUDY, base).train.epochs
    return {
        "study": STUDY,
        "overrides": base,
        "goal_epoch_ratio": GOAL_EPOCH_RATIO,
        "goal_accuracy_pp": GOAL_ACCURACY_PP,
        "machine": machine(),
        "versions": versions(),
        "ray_start_s": ray_start_s,
        "warm_up_s": warm_up_s,
        "runs": runs,
        "epochs": epochs,
        "hyperband_ceiling": hyperband_ceiling(epochs),
        "met_epochs": hb["epoch_ratio"] >= GOAL_EPOCH_RATIO,
        "met_accuracy": hb["best_drop_pp"] <= GOAL_ACCURACY_PP,
        "met": hb["epoch_ratio"] >= GOAL_EPOCH_RATIO and hb["best_drop_pp"] <= GOAL_ACCURACY_PP,
    }


def summary(result: dict[str, Any]) -> list[str]:
    lines = [f"pruning: {result['study']} {' '.join('--set ' + o for o in result['overrides'])}"]
    for name, r in result["runs"].items():
        lines.append(
            f"  {name}: {r['epochs']} epochs ({r['n_complete']} complete, {r['n_pruned']} pruned, {r['n_failed']} "
            f"failed), training {r['in_trial_s']:.1f} s, wall {r['wall_s']:.1f} s, best val_accuracy {r['best_val_accuracy']:.4f} "
            f"({r['vs_none_pp']:+.2f} pp vs none), {r['epoch_ratio']:.2f}x fewer epochs; load {r['load_1min']:.1f}"
        )
    hb = result["runs"]["hyperband"]
    lines.append(f"  hyperband: {hb['epoch_ratio']:.2f}x fewer epochs (goal >= {result['goal_epoch_ratio']:.0f}x: "
                 f"{'met' if result['met_epochs'] else 'NOT met'}), best {hb['vs_none_pp']:+.2f} pp vs none "
                 f"(goal: at most {result['goal_accuracy_pp']} pp below: {'met' if result['met_accuracy'] else 'NOT met'})"
                 + f"; ceiling at {result['epochs']} epochs: {result['hyperband_ceiling']:.1f}x")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    rows = [
        "| pruner | epochs trained | × fewer than none | complete / pruned / failed | same params as none | "
        "training s (Σ epoch_time_s) | wall s | best trial | best val_accuracy | vs none (pp) | its test_accuracy | "
        "load (1 min) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["runs"].items():
        test = f"{r['best_test_accuracy']:.4f}" if r["best_test_accuracy"] is not None else "–"
        rows.append(
            f"| {name} | {r['epochs']} | {r['epoch_ratio']:.2f} | {r['n_complete']} / {r['n_pruned']} / "
            f"{r['n_failed']} | {r['same_params_as_none']} of {r['n_trials']} | {r['in_trial_s']:.1f} | {r['wall_s']:.1f} "
            f"| {r['best_number']} | {r['best_val_accuracy']:.4f} | {r['vs_none_pp']:+.2f} | {test} | {r['load_1min']:.1f} |"
        )
    hb = result["runs"]["hyperband"]
    goals = [
        "| goal (hyperband vs none) | measured | met |",
        "|---|---:|---|",
        f"| ≥ {result['goal_epoch_ratio']:.0f}× fewer epochs | {hb['epoch_ratio']:.2f}× "
        f"| {'yes' if result['met_epochs'] else 'no'} |",
        f"| best val_accuracy at most {result['goal_accuracy_pp']} pp lower | {hb['vs_none_pp']:+.2f} pp "
        f"| {'yes' if result['met_accuracy'] else 'no'} |",
    ]
    busiest = max(r["load_1min"] for r in result["runs"].values())
    shared = (f" The machine was shared while it ran (1-minute load average up to {busiest:.1f} on "
              f"{m['cpu_count']} CPUs), so wall and training times are noisy."
              if busiest > (m["cpu_count"] or 1) else "")
    return (
        "The same MNIST study run once per pruner (`python -m bench pruning`): `none`, the study's own "
        "`median` (n_startup_trials 5, n_warmup_steps 2) and `hyperband` (Optuna's defaults). Every run "
        "has its own temporary stores; all share one Ray session started beforehand. Trials run two at a "
        "time, so after TPE's random start-up trials the proposals depend on what finished first and what "
        "was pruned (the column \"same params as none\" counts trials whose parameters match the `none` "
        "run's trial of the same number).\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; Ray {v['ray']}, Optuna {v['optuna']}, "
        f"MLflow {v['mlflow']}, torch {v['torch']}. Study: {result['study']} "
        f"{' '.join('--set ' + o for o in result['overrides'])}.\n\n"
        + "\n".join(rows) + "\n\n" + "\n".join(goals)
        + f"\n\nA ceiling on the goal: with {result['epochs']} epochs per trial, Optuna's Hyperband (min_resource 1, "
        f"reduction factor 3) has rungs at epochs {', '.join(str(r) for r in _rungs(result['epochs']))} in its most "
        "aggressive bracket. Even if every trial fell in that bracket and exactly a third went on at every rung, "
        f"it would train {result['hyperband_ceiling']:.1f}× fewer epochs than no pruning; the other brackets, and "
        "the first trials at a rung (which go on while they are the best so far), save less. Longer trials raise "
        f"the ceiling (27 epochs: {hyperband_ceiling(27):.0f}×)."
        + "\n\nEpoch counts vary a little from run to run even with the same trials: with two trials at a "
        "time, what a pruner decides at a rung depends on which trials reported there first."
        + f" Raw numbers: `bench/out/pruning.json`.{shared}"
    )


def hyperband_ceiling(epochs: int, reduction_factor: int = 3, min_resource: int = 1) -> float:
    """Epochs without pruning / epochs with successive halving at its most aggressive (an upper bound).

    Rungs at min_resource x reduction_factor**k below `epochs`; at each, all but 1/reduction_factor of the
    trials that reach it stop there; the rest train every epoch.
    """
    mean, reaching = 0.0, 1.0
    for rung in _rungs(epochs, reduction_factor, min_resource):
        stopping = reaching * (1 - 1 / reduction_factor)
        mean += stopping * rung
        reaching -= stopping
    return epochs / (mean + reaching * epochs)


def _rungs(epochs: int, reduction_factor: int = 3, min_resource: int = 1) -> list[int]:
    rungs, rung = [], min_resource
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def _run_one(study_overrides: list[str]) -> dict[str, Any]:
    import optuna

    from dlsearch.tuner.runner import open_storage, run_study
    from dlsearch.config.spec import load_spec

    spec = load_spec(REPO / STUDY, study_overrides)
    epoch_s: list[float] = []

    def on_event(kind: str, info: Mapping[str, Any]) -> None:
        if kind == "epoch":
            epoch_s.append(float(info["metrics"]["epoch_time_s"]))

    load = load_1min()
    started = time.perf_counter()
    summary = run_study(spec, on_event=on_event)
    wall_s = time.perf_counter() - started
    study = optuna.load_study(study_name=summary.name, storage=open_storage(spec))
    return {
        "pruner": spec.pruner.type,
        "epochs": summary.epochs_run,
        "n_trials": summary.n_complete + summary.n_pruned + summary.n_failed,
        "n_complete": summary.n_complete,
        "n_pruned": summary.n_pruned,
        "n_failed": summary.n_failed,
        "wall_s": wall_s,
        "in_trial_s": sum(epoch_s),  # the training itself: Σ epoch_time_s over every epoch trained
        "best_number": summary.best_number,
        "best_val_accuracy": summary.best_value,
        "best_test_accuracy": summary.best_test_accuracy,
        "best_params": summary.best_params,
        "load_1min": load,
        # Trial number -> its parameters (as strings: JSON keys), to count the trials every run shares.
        "params": {str(t.number): t.params for t in study.trials},
        "epochs_per_trial": {str(t.number): len(t.intermediate_values) for t in study.trials},
    }
