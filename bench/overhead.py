"""What does dlsearch cost per trial on top of the training itself, against a hand-glued peer?

Goals: at most 0.3 s of framework overhead per trial, and at most 1/10 of the peer's.

Overhead per trial = (study wall time x concurrency - sum of in-trial time) / trials. The
in-trial time of a trial is the sum of its epochs' `epoch_time_s` (what `train_trial` measures:
one training pass and one validation pass); everything else a slot spends is overhead: Ray
dispatch, worker start-up and imports, data loading, model set-up, the test evaluation,
checkpoints, sampling, Optuna and MLflow writes, and the study's own set-up and end (stores,
leaderboard, plots).

The sides run the same study in this process, one after another, on one Ray session started
before any of them (so Ray's start-up is in none; it is reported on its own) and, outside
--quick, after an untimed warm-up of the workers (`bench.warm_up_workers`):

- dlsearch: `run_study` on studies/digits.yaml with `pruner: none` (every trial does the same
  work), every store in a temporary folder, `register_best: false` (the peer registers no
  model; everything else `dlsearch run` does at the end of a study is timed);
- dlsearch with `resources.population` = the number of trials: the same study, but trials that
  share the model's shapes train as one stacked model in one Tune trial (`dlsearch.trial.population`);
  a population's epoch counts once in the in-trial time (its members report the same epoch);
- the peer: the script a user glues together from the libraries' documented integrations:
  `tune.Tuner` + `ray.tune.search.optuna.OptunaSearch` (the same define-by-run search space via
  `dlsearch.search.space.suggest`, the same TPE settings and seed) +
  `ray.air.integrations.mlflow.MLflowLoggerCallback` (to a SQLite store in a temporary folder).
  Its trainable runs the same `dlsearch.trial.train.train_trial` on the same data and calls
  `ray.tune.report` once per epoch (no checkpoints). It runs with Tune's defaults (a fresh actor,
  so a fresh worker process, per trial) and, outside --quick, also with `reuse_actors=True`, the
  one setting that changes its cost most (dlsearch reuses actors).

The full run repeats every side in two rounds, the second in reverse order, so that drift in
the machine's load hits every side alike; a side's figure is the mean of its rounds. The
in-trial time comes from each trial's own `epoch_time_s`: for dlsearch from the `epoch` events
`run_study` emits, for the peer from Tune's per-trial results.

Besides the whole-study figure, each run reports a steady-state figure: the same formula over
the window from the first epoch reported to the last trial's end, which leaves out the study's
set-up, the first worker start-ups and the study's end (it counts all in-trial time, so it is
a slight underestimate).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from bench import REPO, load_1min, machine, ray_session, store_overrides, versions, warm_up_workers

HEADING = "## Framework overhead per trial: dlsearch vs hand-glued Ray Tune + Optuna + MLflow (`bench/overhead.py`)"
GOAL_S = 0.3  # dlsearch's overhead per trial
GOAL_RATIO = 0.1  # dlsearch's overhead / the peer's (with Tune's defaults)
STUDY = "studies/digits.yaml"
SIDE_NAMES = {
    "dlsearch": "dlsearch `run_study`",
    "dlsearch_population": "dlsearch `run_study`, `resources.population` = trials",
    "peer": "peer, Tune defaults (fresh actor per trial)",
    "peer_reuse_actors": "peer, `reuse_actors=True`",
}


@dataclass(frozen=True)
class Setup:
    n_trials: int
    epochs: int
    concurrency: int
    rounds: int
    sides: tuple[str, ...]
    warm_up: bool


def setup(quick: bool) -> Setup:
    if quick:  # a smoke run: every code path once, no fairness measures; its figures mean little
        return Setup(n_trials=2, epochs=1, concurrency=2, rounds=1, sides=("dlsearch", "dlsearch_population", "peer"),
                     warm_up=False)
    return Setup(n_trials=16, epochs=3, concurrency=2, rounds=2, sides=tuple(SIDE_NAMES), warm_up=True)


def run(quick: bool = False) -> dict[str, Any]:
    """Time every side in every round; JSON-ready raw results and the per-side means."""
    s = setup(quick)
    measure: dict[str, Callable[[Setup, Path], dict[str, Any]]] = {
        "dlsearch": _dlsearch, "dlsearch_population": _dlsearch_population, "peer": _peer,
        "peer_reuse_actors": _peer_reusing_actors}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in s.sides}
    with ray_session() as ray_start_s:
        from dlsearch.config.spec import load_spec

        spec = load_spec(REPO / STUDY)
        warm_up_s = warm_up_workers(spec.data, spec.seed, s.concurrency) if s.warm_up else 0.0
        for round_ in range(s.rounds):
            for side in (s.sides if round_ % 2 == 0 else s.sides[::-1]):
                with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{side}-") as tmp:
                    load = load_1min()
                    r = measure[side](s, Path(tmp))
                r["load_1min"] = load
                r["overhead_per_trial_s"] = (r["wall_s"] * s.concurrency - r["in_trial_s"]) / r["n_trials"]
                r["steady_overhead_per_trial_s"] = (
                    r["steady_s"] * s.concurrency - r["in_trial_s"]) / r["n_trials"]
                runs[side].append(r)
    sides = {side: _mean(rs) for side, rs in runs.items()}
    dls = sides["dlsearch"]["overhead_per_trial_s"]
    ratio = dls / sides["peer"]["overhead_per_trial_s"]
    reuse = sides.get("peer_reuse_actors")
    return {
        **asdict(s),
        "study": STUDY,
        "goal_s": GOAL_S,
        "goal_ratio": GOAL_RATIO,
        "machine": machine(),
        "versions": versions(),
        "ray_start_s": ray_start_s,
        "warm_up_s": warm_up_s,
        "runs": runs,
        "sides": sides,
        "ratio": ratio,
        "ratio_reuse_actors": dls / reuse["overhead_per_trial_s"] if reuse else None,
        "population_ratio": (sides["dlsearch_population"]["overhead_per_trial_s"] / sides["peer"]["overhead_per_trial_s"]
                             if "dlsearch_population" in sides else None),
        "steady_ratio": sides["dlsearch"]["steady_overhead_per_trial_s"] / sides["peer"]["steady_overhead_per_trial_s"],
        "met_s": dls <= GOAL_S,
        "met_ratio": ratio <= GOAL_RATIO,
        "load_1min_max": max(r["load_1min"] for rs in runs.values() for r in rs),
    }


def summary(result: dict[str, Any]) -> list[str]:
    lines = [f"overhead: {result['n_trials']} digits trials x {result['epochs']} epochs, {result['concurrency']} "
             f"at once, {result['rounds']} round(s); Ray start-up {result['ray_start_s']:.1f} s (in no side)"]
    for side, r in result["sides"].items():
        lines.append(
            f"  {side}: wall {r['wall_s']:.1f} s, in-trial {r['in_trial_s']:.2f} s over {r['n_epochs']:.0f} epochs; "
            f"overhead {r['overhead_per_trial_s']:.3f} s/trial (steady state {r['steady_overhead_per_trial_s']:.3f})"
        )
    d = result["sides"]["dlsearch"]["overhead_per_trial_s"]
    line = (f"  dlsearch {d:.3f} s/trial (goal <= {result['goal_s']} s: {'met' if result['met_s'] else 'NOT met'}); "
            f"dlsearch/peer {result['ratio']:.3f} (goal <= {result['goal_ratio']}: "
            f"{'met' if result['met_ratio'] else 'NOT met'})")
    if result["ratio_reuse_actors"] is not None:
        line += f"; dlsearch/peer reusing actors {result['ratio_reuse_actors']:.3f}"
    if result.get("population_ratio") is not None:
        line += f"; dlsearch with populations/peer {result['population_ratio']:.3f}"
    lines.append(line + f"; 1-min load up to {result['load_1min_max']:.1f}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    rows = [
        "| side | wall s | in-trial s | epochs | overhead s/trial | steady-state overhead s/trial | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in result["sides"].items():
        rounds = result["runs"][side]
        spread = (f" ({min(x['overhead_per_trial_s'] for x in rounds):.3f}–"
                  f"{max(x['overhead_per_trial_s'] for x in rounds):.3f})" if len(rounds) > 1 else "")
        loads = ", ".join(f"{x['load_1min']:.1f}" for x in rounds)
        rows.append(f"| {SIDE_NAMES[side]} | {r['wall_s']:.1f} | {r['in_trial_s']:.2f} | {r['n_epochs']:.0f} "
                    f"| {r['overhead_per_trial_s']:.3f}{spread} | {r['steady_overhead_per_trial_s']:.3f} | {loads} |")
    d = result["sides"]["dlsearch"]
    goals = [
        "| goal | measured | met |",
        "|---|---:|---|",
        f"| dlsearch overhead ≤ {result['goal_s']} s/trial | {d['overhead_per_trial_s']:.3f} s "
        f"| {'yes' if result['met_s'] else 'no'} |",
        f"| dlsearch / peer with Tune's defaults ≤ {result['goal_ratio']} | {result['ratio']:.3f} "
        f"| {'yes' if result['met_ratio'] else 'no'} |",
        f"| (for reference) steady state, dlsearch / peer with Tune's defaults | {result['steady_ratio']:.3f} | |",
    ]
    pop = result["sides"].get("dlsearch_population")
    if pop is not None:
        goals += [
            f"| dlsearch with populations: overhead ≤ {result['goal_s']} s/trial | {pop['overhead_per_trial_s']:.3f} s "
            f"| {'yes' if pop['overhead_per_trial_s'] <= result['goal_s'] else 'no'} |",
            f"| dlsearch with populations / peer with Tune's defaults ≤ {result['goal_ratio']} "
            f"| {result['population_ratio']:.3f} | {'yes' if result['population_ratio'] <= result['goal_ratio'] else 'no'} |",
        ]
    if result["ratio_reuse_actors"] is not None:
        goals.append(f"| (for reference) dlsearch / peer with `reuse_actors=True` | {result['ratio_reuse_actors']:.3f} | |")
    phases = (f"dlsearch's wall time splits into {d['before_first_trial_s']:.1f} s before its first trial (stores, "
              f"parent run, data check), {d['start_up_s']:.1f} s from there to the first epoch reported (worker "
              f"start-up, imports, data), {d['steady_s']:.1f} s of steady state to the last trial's end, and "
              f"{d['after_last_trial_s']:.1f} s after it (leaderboard, plots, artifacts).")
    shared = (f" The machine was shared while it ran (1-minute load average up to {result['load_1min_max']:.1f} on "
              f"{m['cpu_count']} CPUs; the last column gives it before each round), which inflates every "
              "side's start-ups." if result["load_1min_max"] > (m["cpu_count"] or 1) else "")
    return (
        "Framework overhead per trial = (study wall time × concurrency − Σ in-trial time) / trials "
        "(`python -m bench overhead`), where a trial's in-trial time is the sum of its epochs' "
        "`epoch_time_s` (one training and one validation pass). The peer is the script one glues from "
        "the libraries' own integrations: `tune.Tuner` + `OptunaSearch` (same define-by-run space, same "
        "TPE settings and seed) + `MLflowLoggerCallback` to SQLite, whose trainable runs the same "
        "`train_trial` on the same data and reports each epoch with `ray.tune.report`. Every side runs on "
        "one Ray session started beforehand, so Ray's start-up "
        f"({result['ray_start_s']:.1f} s) is in none of them, after an untimed warm-up of the workers "
        "(not in --quick); "
        "every store is in a temporary folder. Steady state: the same formula from the first epoch "
        "reported to the last trial's end. The module docstring of `bench/overhead.py` has the details.\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; Ray {v['ray']}, Optuna {v['optuna']}, "
        f"MLflow {v['mlflow']}, torch {v['torch']}. Study: {result['study']} with {result['n_trials']} trials × "
        f"{result['epochs']} epochs, {result['concurrency']} at once, `pruner: none`, "
        f"`tracking.register_best: false`; {result['rounds']} round(s) per side (the second in reverse "
        "order), a cell is the mean over rounds (range in brackets).\n\n"
        + "\n".join(rows) + "\n\n" + "\n".join(goals)
        + f"\n\n{phases} Raw numbers: `bench/out/overhead.json`.{shared}"
    )


# ---------------------------------------------------------------- the sides


def study_overrides(s: Setup, folder: Path) -> list[str]:
    """The digits study with every trial doing the same work, its stores in `folder`."""
    return [
        f"budget.trials={s.n_trials}",
        f"train.epochs={s.epochs}",
        "pruner={type: none}",
        f"resources.max_concurrent={s.concurrency}",
        "resources.cpus_per_trial=1",
        "tracking.register_best=false",
        *store_overrides(folder),
    ]


def _dlsearch_population(s: Setup, folder: Path) -> dict[str, Any]:
    return _dlsearch(s, folder, population=s.n_trials)


def _dlsearch(s: Setup, folder: Path, population: int = 1) -> dict[str, Any]:
    from dlsearch.tuner.runner import run_study
    from dlsearch.config.spec import load_spec

    spec = load_spec(REPO / STUDY, study_overrides(s, folder) + [f"resources.population={population}"])
    epoch_s: list[float] = []
    marks: dict[str, float] = {}
    seen: set[tuple[Any, ...]] = set()

    def on_event(kind: str, info: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "epoch":
            marks["n_epochs"] = marks.get("n_epochs", 0) + 1
            # The members of a population train one round together (each at its own epoch once it
            # refills), timed once for all of them: one round, one `epoch_time_s`.
            metrics = info["metrics"]
            key = ((info["population"], metrics["epoch_time_s"]) if info.get("population")
                   else (info["number"], info["epoch"]))
            if key not in seen:
                seen.add(key)
                epoch_s.append(float(info["metrics"]["epoch_time_s"]))
            marks.setdefault("first_epoch", now)
        elif kind == "trial_start":
            marks.setdefault("first_trial_start", now)
        elif kind == "trial_end":
            marks["last_trial_end"] = now

    started = time.perf_counter()
    summary = run_study(spec, on_event=on_event)
    ended = time.perf_counter()
    return {
        "wall_s": ended - started,
        "in_trial_s": sum(epoch_s),
        "n_trials": summary.n_complete + summary.n_pruned + summary.n_failed,
        "n_epochs": marks["n_epochs"],
        "n_failed": summary.n_failed,
        "before_first_trial_s": marks["first_trial_start"] - started,
        "start_up_s": marks["first_epoch"] - marks["first_trial_start"],
        "steady_s": marks["last_trial_end"] - marks["first_epoch"],
        "after_last_trial_s": ended - marks["last_trial_end"],
    }


def _peer(s: Setup, folder: Path, reuse_actors: bool = False) -> dict[str, Any]:
    """The hand-glued script: Tuner + OptunaSearch + MLflowLoggerCallback, timed from building the Tuner."""
    import optuna
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from dlsearch.search.build import resolve_startup

    from dlsearch.config.spec import load_spec

    spec = load_spec(REPO / STUDY, study_overrides(s, folder))
    objective = spec.objectives[0]
    marks = _Marks()
    started = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_peer_trainable, spec=spec), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(
                space=_PeerSpace(spec), metric=objective.metric, mode=objective.direction[:3],
                sampler=optuna.samplers.TPESampler(
                    seed=spec.seed, **resolve_startup(dict(spec.sampler.model_extra or {}), s.concurrency)),
            ),
            num_samples=s.n_trials,
            max_concurrent_trials=s.concurrency,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name="peer", storage_path=str(folder / "ray"), verbose=0,
            # Tune's own result files, asked for: the dlsearch side of this process turned its
            # automatic loggers off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS), and the curves are read from them.
            callbacks=[MLflowLoggerCallback(tracking_uri=f"sqlite:///{folder}/mlflow.db",
                                            experiment_name=spec.name, save_artifact=False), marks,
                       JsonLoggerCallback(), CSVLoggerCallback()],
        ),
    )
    grid = tuner.fit()
    wall_s = time.perf_counter() - started
    epoch_s = [float(x) for r in grid for x in r.metrics_dataframe.get("epoch_time_s", []).dropna()]
    return {
        "wall_s": wall_s,
        "in_trial_s": sum(epoch_s),
        "n_trials": len(grid),
        "n_epochs": len(epoch_s),
        "n_failed": grid.num_errors,
        "steady_s": marks.last_trial_end - marks.first_result,
    }


def _peer_reusing_actors(s: Setup, folder: Path) -> dict[str, Any]:
    return _peer(s, folder, reuse_actors=True)


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.fmean(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}


class _PeerSpace:
    """The peer's define-by-run search space (a class: Tune pickles its searcher's state)."""

    def __init__(self, spec: Any):
        self.spec = spec

    def __call__(self, trial: Any) -> dict[str, Any]:
        from dlsearch.search.space import suggest

        suggest(trial, self.spec)  # OptunaSearch captures the suggestions as the config
        return {"number": trial.number}  # the trial seed derives from it, as in dlsearch


def _peer_trainable(config: dict[str, Any], spec: Any) -> None:
    """The peer's Tune function trainable: the same `train_trial` on the same data, one report per epoch."""
    from ray import tune

    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.data import load_data
    from dlsearch.trial.train import train_trial

    params = {k: v for k, v in config.items() if k != "number"}
    cfg = trial_config(spec, params, int(config["number"]))
    data = load_data(cfg.data, cfg.data_seed)
    train_trial(cfg, data, lambda epoch, metrics, checkpoint=None: tune.report({**metrics, "epoch": epoch}))


def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class _Marks(_callback_base()):
    """The bench's own stopwatch on the peer (not part of the peer): first result, last trial end."""

    def __init__(self) -> None:
        self.first_result = 0.0
        self.last_trial_end = 0.0

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.first_result = self.first_result or time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last_trial_end = time.perf_counter()
