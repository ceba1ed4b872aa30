"""Search quality on real learning curves: regret at equal epochs on the LCBench surrogate.

Goal (issue 17): a default that beats Optuna's best pairing at equal epochs. Every method runs
the same studies: each of LCBench's 34 OpenML tasks (YAHPO Gym's surrogate, `bench/lcbench_surrogate.py`)
x 5 seeds x 1, 4 and 16 workers, with a budget of 1,040 epochs per study (20 trials of 52 epochs).
The studies run on dlsearch's simulated backend (`dlsearch.tuner.simulate.simulate_study`): the
driver of a real run asks, prunes and tells; each trial replays its surrogate curve on a
simulated clock (an epoch takes the time the surrogate says), so trials finish out of order as
on that many GPUs.

Methods are study-file settings (`sampler:` / `pruner:`) but for Egele et al. (2023)'s baseline,
which dlsearch has no name for (a sampler and pruner built here): train many random
configurations 1 epoch, then train the K best of them to the end.

Regret (accuracy points): a per-task reference, the best trial value of 5,000 random
configurations trained 52 epochs (computed once, cached in ~/.cache/dlsearch/lcbench), minus
the best val_accuracy the study has seen after b epochs (any epoch of any trial: Syne Tune's and
Egele et al.'s convention, defined from the first epoch on). The best COMPLETE trial's regret
(what `dlsearch best` hands back) is given at the end of the budget too. Dev tasks: the first 17
of YAHPO's instance order; the other 17 are held out (a choice made on dev must win there too).

`--quick` (CI): 2 tasks (the first of each half), 1 seed, the same methods and concurrencies.
Optuna's TPE spends most of its time in a pure-Python `log_ndtr`; the benchmark swaps in
scipy's (the same function to 1e-13, `_fast_truncnorm`) so that the full run fits in 30 minutes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import optuna
from optuna.trial import TrialState

from bench import REPO, load_1min, machine, versions

HEADING = "## Search quality on LCBench: regret at equal epochs (`bench/lcbench.py`)"
BUDGET_EPOCHS = 1040  # 20 trials of 52 epochs
SEEDS = (0, 1, 2, 3, 4)
WORKERS = (1, 4, 16)
N_DEV = 17  # the first 17 tasks of the instance order; the other 17 are held out
FRACTIONS = (0.25, 0.5, 1.0)  # of the budget, where regret is tabled
PLOT = REPO / "docs" / "lcbench_regret.png"
# Goals of issue 17 for the proposed default (PROPOSED below), each on dev and held-out tasks.
GOAL_VS_RANDOM_SH_PP = 2.0  # at least this much below random + SH at 16 workers


@dataclass(frozen=True)
class Method:
    """One way to search: edits of the study file, or a study built here (`custom`)."""

    name: str
    study: Mapping[str, Any] = field(default_factory=dict)  # top-level keys replaced in the study file
    custom: str = ""  # "one_epoch": Egele et al.'s baseline (K in `top_k`)
    top_k: int = 0
    note: str = ""


OPTUNA_TPE = {"type": "tpe"}  # Optuna's TPE as it comes (10 random trials first): the pairings' sampler
METHODS = (
    Method("dlsearch default", {},
           note="the study file's default since this benchmark: TPE with `n_startup_trials: auto` (random "
                "until as many trials have finished as run at once, at least 3) + `asha` (successive halving, "
                "rungs at 15% and 45% of the epochs: 8 and 24 of 52; a third goes on at each)"),
    Method("old default", {"sampler": OPTUNA_TPE,
                           "pruner": {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2}},
           note="the SPEC's default before it: TPE + median (n_startup_trials 5, n_warmup_steps 2)"),
    Method("tpe+median", {"sampler": OPTUNA_TPE,
                          "pruner": {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 5}},
           note="the reference run's best pairing: median, n_startup_trials 5, n_warmup_steps 5"),
    Method("tpe", {"sampler": OPTUNA_TPE, "pruner": {"type": "none"}}, note="TPE alone"),
    Method("tpe+hyperband", {"sampler": OPTUNA_TPE, "pruner": {"type": "hyperband"}},
           note="Optuna's defaults (min_resource 1, factor 3)"),
    Method("tpe+sh", {"sampler": OPTUNA_TPE, "pruner": {"type": "successive_halving"}},
           note="Optuna's successive halving, defaults (min_resource auto, factor 4)"),
    Method("tpe+asha", {"sampler": OPTUNA_TPE, "pruner": {"type": "asha"}},
           note="the default's pruner with Optuna's TPE (10 random trials first): what each half of the "
                "default brings"),
    Method("random+sh", {"sampler": {"type": "random"}, "pruner": {"type": "successive_halving"}},
           note="random search + successive halving, Optuna's defaults"),
    Method("random", {"sampler": {"type": "random"}, "pruner": {"type": "none"}}, note="random search alone"),
    Method("one-epoch top-19", custom="one_epoch", top_k=19,
           note="Egele et al. 2023's baseline: 52 random configurations 1 epoch, then the 19 best trained 52 "
                "epochs (K chosen on the dev tasks, 1 worker: K = 3, 5, 10, 15, 17, 19 gave 18.3, 16.7, 12.7, "
                "9.0, 7.1, 4.9)"),
)
PROPOSED = "dlsearch default"
METHOD_NAMES = tuple(m.name for m in METHODS)


def run(quick: bool = False) -> dict[str, Any]:
    """Every method x task x seed x concurrency, one study at a time per CPU core."""
    from bench.lcbench_surrogate import Surrogate

    started, cpu_started = time.perf_counter(), time.process_time()
    tasks = Surrogate().tasks
    chosen = (tasks[0], tasks[N_DEV]) if quick else tasks
    seeds = SEEDS[:1] if quick else SEEDS
    references, results = run_jobs([(m, task, seed, workers) for m in METHODS for task in chosen
                                    for seed in seeds for workers in WORKERS])
    wall_s, reference_s = time.perf_counter() - started, references.pop("_seconds")
    dev = [t for t in chosen if tasks.index(t) < N_DEV]
    return {
        "quick": quick,
        "tasks": list(chosen),
        "dev_tasks": dev,
        "seeds": list(seeds),
        "workers": list(WORKERS),
        "budget_epochs": BUDGET_EPOCHS,
        "methods": {m.name: m.note for m in METHODS},
        "references": references,
        "aggregate": aggregate(results, references, dev),
        "goals": goals(results, references, dev),
        "wall_s": wall_s,
        "reference_s": reference_s,
        "job_cpu_s": sum(r["cpu_s"] for r in results),
        "driver_cpu_s": time.process_time() - cpu_started,
        "n_procs": _n_procs(),
        "n_studies": len(results),
        "load_1min": load_1min(),
        "machine": machine(),
        "versions": {**versions(), "onnxruntime": _onnxruntime_version()},
    }


def run_jobs(jobs: list[tuple[Method, str, int, int]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each (method, task, seed, workers) as one simulated study, in a process per CPU core; the
    per-task references (and the seconds they took, under "_seconds") and each study's result."""
    started = time.perf_counter()
    tasks = list(dict.fromkeys(j[1] for j in jobs))
    # Costly jobs first (many pruned trials, many workers), so that no core idles at the end.
    order = sorted(range(len(jobs)), key=lambda i: (not _prunes_often(jobs[i][0]), -jobs[i][3]))
    with ProcessPoolExecutor(_n_procs(), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        references: dict[str, float] = dict(zip(tasks, pool.map(_reference, tasks)))
        references["_seconds"] = time.perf_counter() - started
        done = dict(zip(order, pool.map(_run_job, [jobs[i] for i in order], chunksize=2)))
    return references, [done[i] for i in range(len(jobs))]  # in the order of `jobs`


def aggregate(results: list[dict[str, Any]], references: Mapping[str, float],
              dev: list[str]) -> dict[str, Any]:
    """Mean regret by method, concurrency and half (dev, held-out, all): at each fraction of the
    budget, the anytime curve (every 10 epochs) for the plot, and the study counts."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in results):
        for workers in dict.fromkeys(r["workers"] for r in results):
            mine = [r for r in results if r["method"] == method and r["workers"] == workers]
            row: dict[str, Any] = {}
            for half, keep in (("dev", lambda t: t in dev), ("held_out", lambda t: t not in dev),
                               ("all", lambda t: True)):
                rs = [r for r in mine if keep(r["task"])]
                if not rs:
                    continue
                curves = np.stack([references[r["task"]] - r["seen"] for r in rs])
                complete = [references[r["task"]] - r["best_complete"] for r in rs if r["best_complete"] is not None]
                row[half] = {
                    "at": {str(f): float(curves[:, round(f * BUDGET_EPOCHS) - 1].mean()) for f in FRACTIONS},
                    "curve": [float(v) for v in curves[:, 9::10].mean(axis=0)],
                    "complete_regret": float(np.mean(complete)) if complete else None,
                    "n_without_complete": len(rs) - len(complete),
                    "n_studies": len(rs),
                }
            row["trials"] = float(np.mean([r["n_trials"] for r in mine]))
            row["pruned"] = float(np.mean([r["n_pruned"] for r in mine]))
            row["sim_h"] = float(np.mean([r["sim_s"] for r in mine])) / 3600
            row["cpu_s"] = float(np.mean([r["cpu_s"] for r in mine]))
            out.setdefault(method, {})[str(workers)] = row
    return out


def goals(results: list[dict[str, Any]], references: Mapping[str, float], dev: list[str],
          proposed: str = PROPOSED) -> list[dict[str, Any]]:
    """Issue 17's goals for `proposed`, on dev and held-out tasks: each a paired comparison over the
    same (task, seed) studies, with the mean difference in regret (points; negative: `proposed`
    is better), its standard error, and whether the goal is met."""
    by = {(r["method"], r["task"], r["seed"], r["workers"]): references[r["task"]] - r["seen"] for r in results}
    out = []
    for half in ("dev", "held_out"):
        keep = [t for t in dict.fromkeys(r["task"] for r in results) if (t in dev) == (half == "dev")]
        if not keep or not any(r["method"] == proposed for r in results):
            continue

        def diff(workers: int, other: str, mine_at: float, theirs_at: float) -> tuple[float, float] | None:
            pairs = [(by[(proposed, t, sd, workers)][round(mine_at * BUDGET_EPOCHS) - 1],
                      by[(other, t, sd, workers)][round(theirs_at * BUDGET_EPOCHS) - 1])
                     for t in keep for sd in {r["seed"] for r in results}
                     if (proposed, t, sd, workers) in by and (other, t, sd, workers) in by]
            if not pairs:
                return None
            d = np.array([a - b for a, b in pairs])
            return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan

        checks = [(f"below tpe+median, {w} worker{'s' if w > 1 else ''}", w, "tpe+median", 1.0, 1.0, 0.0)
                  for w in (1, 4)]
        checks.append((f">= {GOAL_VS_RANDOM_SH_PP:g} points below random+sh, 16 workers", 16, "random+sh", 1.0, 1.0,
                       GOAL_VS_RANDOM_SH_PP))
        checks += [(f"at 25% of the budget below tpe+median at 50%, {w} worker{'s' if w > 1 else ''}", w,
                    "tpe+median", 0.25, 0.5, 0.0) for w in (1, 4)]
        for goal, workers, other, mine_at, theirs_at, margin in checks:
            measured = diff(workers, other, mine_at, theirs_at)
            if measured is not None:
                out.append({"goal": f"{goal}, {half.replace('_', '-')}", "measured": measured[0], "se": measured[1],
                            "met": measured[0] < -margin})
    return out


def summary(result: dict[str, Any]) -> list[str]:
    agg = result["aggregate"]
    lines = [f"lcbench: {result['n_studies']} studies ({len(result['tasks'])} tasks x {len(result['seeds'])} seeds x "
             f"{len(agg)} methods x {len(result['workers'])} concurrencies) in {result['wall_s']:.0f} s wall on "
             f"{result['n_procs']} processes (reference {result['reference_s']:.0f} s, studies "
             f"{result['job_cpu_s']:.0f} CPU s); mean regret (points) at 25/50/100% of {result['budget_epochs']} epochs:"]
    for method, by_workers in agg.items():
        cells = []
        for workers, row in by_workers.items():
            a = row["all"]["at"]
            cells.append(f"{workers}w {a['0.25']:.2f}/{a['0.5']:.2f}/{a['1.0']:.2f}")
        lines.append(f"  {method:>18}: " + "  ".join(cells))
    for g in result["goals"]:
        lines.append(f"  goal {g['goal']}: {g['measured']:+.2f} +- {_se(g)} ({'met' if g['met'] else 'NOT met'})")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The section's body; writes the anytime-regret plot (docs/lcbench_regret.png) beside it."""
    plot_regret(result, PLOT)
    agg, m, v = result["aggregate"], result["machine"], result["versions"]
    halves = [h for h in ("dev", "held_out") if any(h in row for rows in agg.values() for row in rows.values())]
    head = ("| method | workers | " + " | ".join(f"{h} {int(100 * float(f))}%" for h in halves for f in FRACTIONS)
            + " | all 100% | best COMPLETE trial, all | trials / study | pruned / study |")
    rows = [head, "|---|---:|" + "---:|" * (len(halves) * len(FRACTIONS) + 4)]
    for method, by_workers in agg.items():
        for workers, row in by_workers.items():
            cells = [f"{row[h]['at'][str(f)]:.2f}" for h in halves for f in FRACTIONS]
            complete = row["all"]["complete_regret"]
            missing = row["all"]["n_without_complete"]
            rows.append(f"| {method} | {workers} | " + " | ".join(cells) + f" | **{row['all']['at']['1.0']:.2f}** | "
                        + (f"{complete:.2f}" if complete is not None else "–")
                        + (f" ({missing} without one)" if missing else "")
                        + f" | {row['trials']:.0f} | {row['pruned']:.0f} |")
    goal_rows = [f"| goal ({PROPOSED}) | {PROPOSED} minus the other (points, ± standard error) | met |",
                 "|---|---:|---|"]
    goal_rows += [f"| {g['goal']} | {g['measured']:+.2f} ± {_se(g)} | {'yes' if g['met'] else 'no'} |"
                  for g in result["goals"]]
    notes = "\n".join(f"- **{name}**: {note}" for name, note in result["methods"].items())
    return (
        f"`python -m bench lcbench`: {len(result['tasks'])} LCBench tasks (YAHPO Gym's surrogate, read with "
        f"onnxruntime) x seeds {', '.join(map(str, result['seeds']))} x {', '.join(map(str, result['workers']))} "
        f"workers, {result['budget_epochs']:,} epochs per study (20 trials of 52 epochs), on dlsearch's simulated "
        "backend (`dlsearch.tuner.simulate`: the real driver asks, prunes and tells; trials replay their "
        "curves on a simulated clock). Regret: the per-task reference (best of 5,000 random configurations "
        "trained 52 epochs) minus the best val_accuracy seen after that share of the budget, in accuracy "
        "points, averaged over tasks and seeds; dev = the first 17 tasks of YAHPO's instance order, held "
        "out = the other 17. \"Best COMPLETE trial\" is the regret of what `dlsearch best` hands back at the "
        "end of the budget.\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; Optuna {v['optuna']}, onnxruntime "
        f"{v['onnxruntime']}. Wall time {result['wall_s'] / 60:.1f} min on {result['n_procs']} processes "
        f"({result['n_studies']} studies taking {result['job_cpu_s']:,.0f} CPU s, "
        f"{result['job_cpu_s'] / 60 / result['n_procs']:.1f} min on {result['n_procs']} cores of their own; "
        f"the references took {result['reference_s']:.0f} s of it"
        # The benchmark's own processes make a load of about one per CPU; more is someone else's.
        + ("" if result["load_1min"] <= 1.25 * (m["cpu_count"] or 1) else
           f"; the machine was shared, 1-minute load {result['load_1min']:.1f}") + ").\n\n"
        + notes + "\n\n" + "\n".join(rows) + "\n\n" + "\n".join(goal_rows)
        + f"\n\n![anytime regret](docs/{PLOT.name})\n"
    )


def plot_regret(result: dict[str, Any], path: Any) -> None:
    """Mean regret (all tasks) against epochs spent, one panel per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = result["aggregate"]
    workers = result["workers"]
    fig, axes = plt.subplots(1, len(workers), figsize=(5 * len(workers), 4), sharey=True)
    for ax, w in zip(np.atleast_1d(axes), workers):
        for method, by_workers in agg.items():
            curve = by_workers[str(w)]["all"]["curve"]
            x = np.arange(10, 10 * len(curve) + 1, 10)
            ax.plot(x, curve, label=method, lw=2.2 if method == PROPOSED else 1.2,
                    ls="--" if method == "dlsearch default" else "-")
        ax.set_yscale("log")
        ax.set_title(f"{w} worker{'s' if w > 1 else ''}")
        ax.set_xlabel("epochs spent")
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("mean regret (accuracy points)")
    np.atleast_1d(axes)[-1].legend(fontsize=8)
    fig.suptitle(f"LCBench: {len(result['tasks'])} tasks x {len(result['seeds'])} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- one study (in a worker process)

_SURROGATE: Any = None


def _worker_init() -> None:
    global _SURROGATE
    from bench.lcbench_surrogate import Surrogate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _fast_truncnorm()
    _SURROGATE = Surrogate()


def _reference(task: str) -> float:
    return _SURROGATE.reference(task)


def _run_job(job: tuple[Method, str, int, int]) -> dict[str, Any]:
    method, task, seed, workers = job
    cpu = time.process_time()
    sim = run_study(method, task, seed, workers, _SURROGATE)
    seen = np.full(BUDGET_EPOCHS, np.nan)
    best = -math.inf
    for e in sim.epochs[:BUDGET_EPOCHS]:
        best = max(best, e.value) if e.value is not None else best
        seen[e.epochs_run - 1] = best
    seen = _fill_forward(seen)  # float64: regret = reference - seen
    complete = [e.value for e in sim.ends if e.state == "COMPLETE" and e.value is not None]
    return {
        "method": method.name, "task": task, "seed": seed, "workers": workers,
        "seen": seen,
        "best_complete": max(complete) if complete else None,
        "n_trials": len({e.number for e in sim.epochs}),
        "n_pruned": sum(e.state == "PRUNED" for e in sim.ends),
        "sim_s": sim.time_s,
        "cpu_s": time.process_time() - cpu,
    }


def run_study(method: Method, task: str, seed: int, workers: int, surrogate: Any) -> Any:
    """One simulated study of `method` on `task`: 1,040 epochs on `workers` simulated workers."""
    from dlsearch.config.spec import spec_from_dict
    from dlsearch.tuner.simulate import simulate_study

    from bench.lcbench_surrogate import study_dict

    raw = {**study_dict(task, surrogate, seed=seed), **method.study}
    spec = spec_from_dict(raw, source=f"<lcbench {method.name}>", base_dir=REPO)
    if method.custom == "one_epoch":
        n_first = BUDGET_EPOCHS - spec.train.epochs * method.top_k
        return simulate_study(spec, surrogate.curve_of(task), workers, max_epochs=BUDGET_EPOCHS,
                              study=_one_epoch_study(spec, n_first), trials=n_first + method.top_k)
    return simulate_study(spec, surrogate.curve_of(task), workers, max_epochs=BUDGET_EPOCHS)


def _prunes_often(method: Method) -> bool:
    """Whether the method asks many short trials (successive halving, hyperband, the one-epoch baseline)."""
    pruner = method.study.get("pruner", {"type": "asha"})  # none given: the default's
    return bool(method.custom) or pruner.get("type") in ("successive_halving", "asha", "hyperband")


def _n_procs() -> int:
    return max(1, os.cpu_count() or 1)


def _fill_forward(a: np.ndarray) -> np.ndarray:
    """NaN entries take the last value before them (a study that stopped early keeps its best)."""
    idx = np.where(~np.isnan(a), np.arange(len(a)), 0)
    np.maximum.accumulate(idx, out=idx)
    return a[idx]


def _se(goal: Mapping[str, Any]) -> str:
    return "–" if math.isnan(goal["se"]) else f"{goal['se']:.2f}"


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _fast_truncnorm() -> None:
    """Optuna's TPE computes log Phi(x) with a pure-Python loop (`_truncnorm._log_ndtr`, ~60% of a
    TPE study's time here); scipy's `log_ndtr` is the same function (to 1e-13), vectorized."""
    import scipy.special
    from optuna.samplers._tpe import _truncnorm

    _truncnorm._log_ndtr = scipy.special.log_ndtr


# ---------------------------------------------------------------- Egele et al. (2023)'s baseline


def _one_epoch_study(spec: Any, n_first: int) -> optuna.Study:
    """An in-memory study whose first `n_first` trials are random configurations pruned after 1
    epoch; each later trial retrains the best of them not retrained yet (by its epoch-1 value).
    With `BUDGET - 52 K` first trials and K more, the K best are trained to the end."""
    return optuna.create_study(sampler=OneEpochSampler(n_first, spec.seed), pruner=OneEpochPruner(n_first),
                               direction=spec.objectives[0].direction, study_name=spec.name)


class OneEpochSampler(optuna.samplers.BaseSampler):
    """Random for the first `n_first` trials; trial `n_first + i` takes the params of the best
    first-phase trial (by its epoch-1 value) not taken yet, among those that have reported."""

    def __init__(self, n_first: int, seed: int):
        self.n_first = n_first
        self.random = optuna.samplers.RandomSampler(seed=seed)
        self.taken: dict[int, dict[str, Any]] = {}  # trial number -> the params it retrains

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: Any, search_space: Any) -> dict:
        return {}

    def sample_independent(self, study: optuna.Study, trial: Any, name: str, distribution: Any) -> Any:
        if trial.number < self.n_first:
            return self.random.sample_independent(study, trial, name, distribution)
        if trial.number not in self.taken:
            self.taken[trial.number] = self._next_best(study)
        params = self.taken[trial.number]
        return params[name] if name in params else self.random.sample_independent(study, trial, name, distribution)

    def _next_best(self, study: optuna.Study) -> dict[str, Any]:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        first = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.COMPLETE))
                 if t.number < self.n_first and 1 in t.intermediate_values]
        taken = list(self.taken.values())
        for t in sorted(first, key=lambda t: -sign * t.intermediate_values[1]):
            if t.params not in taken:
                return dict(t.params)
        return {}  # none left: a random configuration


class OneEpochPruner(optuna.pruners.BasePruner):
    """Stops the first `n_first` trials after their first epoch."""

    def __init__(self, n_first: int):
        self.n_first = n_first

    def prune(self, study: optuna.Study, trial: Any) -> bool:
        return trial.number < self.n_first and trial.last_step is not None
