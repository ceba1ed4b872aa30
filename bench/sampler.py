"""How long does the driver take to sample the next trial's parameters as the study grows?

No goal yet: this measures how the cost of an `ask` scales, to 1,000 trials (50 with --quick).

What is timed is what `dlsearch.tuner.runner`'s driver does when Tune asks it for a trial:
`study.ask()` then `dlsearch.search.space.suggest(trial, spec)` (every dimension of the search space,
define-by-run, `when:` conditions included): one "ask". The study is built the way the runner
builds it: `optuna.create_study` with `dlsearch.search.space.make_sampler` / `make_pruner` /
`directions` on studies/mnist.yaml's spec (TPE with the study seed and Optuna's defaults, as
shipped; `--set sampler.type=random` for the baseline), on the storage the runner opens
(`dlsearch.tuner.runner.open_storage`: SQLite in a temporary folder) and, for reference, on Optuna's
in-memory storage. No Ray and no training: trials run one at a time, so each ask sees every
earlier trial finished. The four studies (TPE and random, on SQLite and in memory) grow in turn,
trial by trial, so that drift in the machine's speed, and in its disk's, hits all alike. A bare
one-row SQLite commit in the same folder is timed before and after the run: on SQLite every
Optuna write is a transaction of its own, and an ask makes several.

Each trial is then finished the way the driver finishes one, with what a finished MNIST trial
leaves in the storage: the `mlflow_run_id` user attribute, a three-point learning curve reported
with `trial.report(value, step)` (what the pruning scheduler writes per epoch; `should_prune` is
not called) and `study.tell(trial, values)`, which is timed as the "tell". Every trial completes
(none pruned or failed).

The objective told is synthetic, so that TPE has something to model: each sampled dimension is
mapped to its position u in [0, 1] within its range (log scale where the dimension is `log`;
a categorical's choice index over the last index), and

    value = 0.98 - 0.05 * sum over sampled dimensions of (u - 0.3)^2 + noise,  noise ~ N(0, 0.003)

clipped to [0, 1]: a smooth bowl with its optimum at 30% of every range, plus noise from a
generator seeded with the study seed (one draw per trial: the n-th trial of every study gets the
same noise). It reads the dimensions from the spec, so it follows the study file.

"Ask time at n trials" is the median over a window of w asks made while the study already held
n, n+1, ..., n+w-1 finished trials (w = max(10, n / 10)); a window that would run past the last
trial ends at it instead (at 1,000: the asks made with 900 to 999 trials in the study). TPE
samples at random while fewer than `n_startup_trials` (10) trials are finished, so its window at
10 is its first modelled asks. The tell time uses the same windows. Raw per-ask times:
bench/out/sampler.json.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from bench import REPO, load_1min, machine, versions
from dlsearch.search.space import directions, make_pruner, make_sampler, suggest
from dlsearch.config.spec import CategoricalDim, StudySpec, load_spec

HEADING = "## Sampler time per ask as the study grows: TPE vs random, SQLite vs in-memory (`bench/sampler.py`)"
STUDY = "studies/mnist.yaml"
SAMPLERS = ("tpe", "random")
STORAGES = ("sqlite", "memory")
CURVE_POINTS = 3  # intermediate values reported per trial, as a trial's epochs would be
NOISE_SD = 0.003  # of the synthetic objective (an accuracy)


@dataclass(frozen=True)
class Plan:
    n_trials: int  # per sampler x storage
    points: tuple[int, ...]  # trial counts the ask time is reported at


def plan(quick: bool) -> Plan:
    return Plan(50, (10, 25, 50)) if quick else Plan(1000, (10, 100, 250, 500, 1000))


def run(quick: bool = False) -> dict[str, Any]:
    """Grow one study per sampler x storage to `plan(quick).n_trials`, interleaved; per-ask times and medians."""
    p = plan(quick)
    spec = load_spec(REPO / STUDY)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as `run_study` sets it: no info line per trial
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
            growths = [_Growth(sampler, storage, Path(tmp) / f"{sampler}-{storage}")
                       for sampler in SAMPLERS for storage in STORAGES]
            commit_ms = [_commit_ms(Path(tmp))]
            loads = [load_1min()]
            # Trial by trial in turn, so that drift in the machine's (and its disk's) speed hits all alike.
            for number in range(p.n_trials):
                for growth in growths:
                    growth.trial(number)
                if (number + 1) % max(1, p.n_trials // 4) == 0:
                    loads.append(load_1min())
            commit_ms.append(_commit_ms(Path(tmp)))
            results = [growth.result(p) for growth in growths]
    finally:
        optuna.logging.set_verbosity(level)
    at_last = {(g["sampler"], g["storage"]): g["at"][-1] for g in results}
    return {
        "study": STUDY,
        **asdict(p),
        "curve_points": CURVE_POINTS,
        "noise_sd": NOISE_SD,
        "machine": machine(),
        "versions": {**versions(), "sqlalchemy": _sqlalchemy_version()},
        "n_dimensions": len(spec.search),
        "conditional": [key for key, dim in spec.search.items() if dim.when],
        "growths": results,
        "tpe_over_random": {storage: at_last[("tpe", storage)]["ask_ms"] / at_last[("random", storage)]["ask_ms"]
                            for storage in STORAGES},
        "tpe_over_random_p25": {storage: at_last[("tpe", storage)]["ask_ms_p25"]
                                / at_last[("random", storage)]["ask_ms_p25"] for storage in STORAGES},
        "at": p.points[-1],
        # A bare SQLite commit in the same folder before and after the run: on SQLite an ask makes
        # several commits, and a shared disk's fsync time drifts.
        "commit_ms": commit_ms,
        "load_1min": loads,  # before the run, then after each quarter of it
    }


def summary(result: dict[str, Any]) -> list[str]:
    lines = [(f"sampler: {result['study']}, {result['n_trials']} trials per sampler x storage; ms per ask (tell) "
              f"at {', '.join(str(n) for n in result['points'])} trials")]
    for g in result["growths"]:
        cells = ", ".join(f"{a['ask_ms']:.2f} ({a['tell_ms']:.2f})" for a in g["at"])
        lines.append(f"  {g['sampler']:>6} on {g['storage']:<6}: {cells}; its trials took {g['wall_s']:.1f} s")
    ratios = ", ".join(f"{s} {r:.1f}x (lower quartiles {result['tpe_over_random_p25'][s]:.1f}x)"
                       for s, r in result["tpe_over_random"].items())
    lines.append(f"  TPE / random per ask at {result['at']} trials: {ratios}; a bare SQLite commit "
                 f"{' -> '.join(f'{x:.1f}' for x in result['commit_ms'])} ms; load "
                 f"{', '.join(f'{x:.1f}' for x in result['load_1min'])}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    points = result["points"]
    head = "| sampler | storage | " + " | ".join(f"{n} trials" for n in points)
    ask = [head + f" | {points[-1]} / {points[0]} | its trials took s |", "|---|---|" + "---:|" * (len(points) + 2)]
    tell = [head + " |", "|---|---|" + "---:|" * len(points)]
    quartile = [head + " |", "|---|---|" + "---:|" * len(points)]
    learned = ["| sampler | storage | mean value, first 10 trials | mean value, last 10% of trials | best value |",
               "|---|---|---:|---:|---:|"]
    for g in result["growths"]:
        name = f"| {g['sampler']} | {g['storage']} | "
        ask.append(name + " | ".join(f"{a['ask_ms']:.2f}" for a in g["at"])
                   + f" | {g['at'][-1]['ask_ms'] / g['at'][0]['ask_ms']:.1f}× | {g['wall_s']:.1f} |")
        tell.append(name + " | ".join(f"{a['tell_ms']:.2f}" for a in g["at"]) + " |")
        quartile.append(name + " | ".join(f"{a['ask_ms_p25']:.2f}" for a in g["at"]) + " |")
        learned.append(name + f"{g['mean_value_first']:.4f} | {g['mean_value_last']:.4f} | {g['best_value']:.4f} |")
    ratios = "; ".join(f"{r:.1f}× on {s}" for s, r in result["tpe_over_random"].items())
    ratios_p25 = "; ".join(f"{r:.1f}× on {s}" for s, r in result["tpe_over_random_p25"].items())
    windows = ", ".join(f"{a['n']}: {a['window'][0]}–{a['window'][1]}" for a in result["growths"][0]["at"])
    loads = result["load_1min"]
    commits = " and ".join(f"{g['commits_per_ask']:.1f} times with {g['sampler']}"
                           for g in result["growths"] if g["storage"] == "sqlite")
    busy = (f" The machine was shared while it ran (1-minute load average {', '.join(f'{x:.1f}' for x in loads)} "
            f"at the start and after each quarter, on {m['cpu_count']} CPUs)." if max(loads) > (m["cpu_count"] or 1)
            else f" 1-minute load average {', '.join(f'{x:.1f}' for x in loads)} at the start and after each quarter.")
    return (
        "Time the driver spends sampling the next trial's parameters as an Optuna study grows "
        f"(`python -m bench sampler`): `study.ask()` plus `dlsearch.search.space.suggest` over {result['study']}'s "
        f"search space ({result['n_dimensions']} dimensions, {', '.join(result['conditional']) or 'none'} "
        "conditional), on a study built as `run_study` builds it (`make_sampler`: TPE with the study seed and "
        "Optuna's defaults, or random as the baseline), on SQLite in a temporary folder opened by "
        "`dlsearch.tuner.runner.open_storage` and, for reference, on Optuna's in-memory storage. No Ray, no "
        "training: trials run one at a time (the four studies in turn, trial by trial, so drift hits all "
        f"alike); each stores the `mlflow_run_id` user attribute and a {result['curve_points']}-point curve as "
        "a real one does, and is told a synthetic objective (a smooth bowl over the parameters' positions in "
        f"their ranges plus N(0, {result['noise_sd']}) noise; the module docstring of `bench/sampler.py` gives "
        "the formula).\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; Optuna {v['optuna']}, "
        f"SQLAlchemy {v['sqlalchemy']}, Python {m['python']}. A cell is the median ms over a window of asks "
        f"(trials already in the study: {windows}).\n\n"
        "ms per ask (`ask` + `suggest` of every parameter):\n\n" + "\n".join(ask)
        + f"\n\n**TPE / random per ask at {result['at']} trials: {ratios}.**\n\n"
        "The same asks' lower quartiles (other processes only ever add time, so these are the steadier view "
        "on a shared machine):\n\n" + "\n".join(quartile)
        + f"\n\nTPE / random at {result['at']} trials on the lower quartiles: {ratios_p25}.\n\n"
        "ms per tell (`study.tell`, same windows):\n\n" + "\n".join(tell)
        + "\n\nThat TPE modelled the objective (higher is better; TPE samples at random until 10 trials are "
        "finished):\n\n" + "\n".join(learned)
        + "\n\nOn SQLite every Optuna write is a transaction of its own: the new trial, each parameter as it is "
        "suggested and (TPE) the constant liar's record of the parameters it sampled together. An ask "
        f"committed {commits} on average, each in a SQLAlchemy session of its own, so on SQLite most of an "
        "ask's time is the storage's, not the sampler's (compare random on SQLite and in memory), and it varies "
        f"with the machine and its disk: a bare one-row SQLite commit in the same folder took "
        f"{result['commit_ms'][0]:.1f} ms (median of 20) before the run and {result['commit_ms'][1]:.1f} ms after "
        f"it.{busy} Raw per-ask times: "
        "`bench/out/sampler.json`."
    )


def synthetic_value(spec: StudySpec, params: dict[str, Any], noise: float) -> float:
    """The objective told for `params`: 0.98 - 0.05 * sum (u - 0.3)^2 + noise, clipped to [0, 1].

    u is each sampled dimension's position in [0, 1] within its range (log scale for `log`
    dimensions; a categorical's choice index / (choices - 1)).
    """
    penalty = 0.0
    for key, value in params.items():
        dim = spec.search[key]
        if isinstance(dim, CategoricalDim):
            u = dim.choices.index(value) / max(1, len(dim.choices) - 1)
        elif dim.log:
            u = math.log(value / dim.low) / math.log(dim.high / dim.low)
        else:
            u = (value - dim.low) / (dim.high - dim.low)
        penalty += (u - 0.3) ** 2
    return min(1.0, max(0.0, 0.98 - 0.05 * penalty + noise))


# ---------------------------------------------------------------- measuring


class _Growth:
    """One study (one sampler on one storage) grown one trial at a time; each ask and tell timed."""

    def __init__(self, sampler: str, storage: str, folder: Path) -> None:
        from dlsearch.tuner.runner import open_storage  # imports MLflow: only when a benchmark runs

        folder.mkdir(parents=True)
        self.sampler, self.storage = sampler, storage
        self.spec = load_spec(REPO / STUDY, [f"sampler.type={sampler}",
                                             f"tracking.optuna_storage=sqlite:///{folder}/optuna.db"])
        self.n_commits = 0  # SQLite transactions committed so far
        if storage == "sqlite":
            from sqlalchemy import event

            rdb = open_storage(self.spec)
            event.listen(rdb.engine, "commit", self._on_commit)
        self.study = optuna.create_study(
            storage=rdb if storage == "sqlite" else optuna.storages.InMemoryStorage(),
            sampler=make_sampler(self.spec), pruner=make_pruner(self.spec), study_name=self.spec.name,
            directions=directions(self.spec),
        )
        self.noise = np.random.default_rng(self.spec.seed)  # its own stream: the sampler's draws stay the study's
        self.ask_ms: list[float] = []
        self.tell_ms: list[float] = []
        self.ask_commits: list[int] = []
        self.values: list[float] = []
        self.wall_s = 0.0

    def trial(self, number: int) -> None:
        commits = self.n_commits
        t0 = time.perf_counter()
        trial = self.study.ask()
        params = suggest(trial, self.spec)
        t1 = time.perf_counter()
        self.ask_commits.append(self.n_commits - commits)
        if trial.number != number:
            raise RuntimeError(f"expected trial number {number}, got {trial.number}: the study was not fresh")
        value = synthetic_value(self.spec, params, float(self.noise.normal(0.0, NOISE_SD)))
        trial.set_user_attr("mlflow_run_id", f"run-{number:04d}")  # what the driver stores after the ask
        for step in range(1, CURVE_POINTS + 1):  # a saturating curve that ends at the value
            trial.report(value * (1 - 0.25**step) / (1 - 0.25**CURVE_POINTS), step=step)
        t2 = time.perf_counter()
        self.study.tell(trial, values=[value])
        t3 = time.perf_counter()
        self.ask_ms.append(1000 * (t1 - t0))
        self.tell_ms.append(1000 * (t3 - t2))
        self.values.append(value)
        self.wall_s += t3 - t0

    def _on_commit(self, connection: Any) -> None:
        self.n_commits += 1

    def result(self, p: Plan) -> dict[str, Any]:
        n_stored = len(self.study.get_trials(deepcopy=False))
        if n_stored != p.n_trials:
            raise RuntimeError(f"expected {p.n_trials} trials in the study, found {n_stored}")
        tenth = max(1, p.n_trials // 10)
        return {
            "sampler": self.sampler,
            "storage": self.storage,
            "n_trials": p.n_trials,
            "at": [_at(n, p.n_trials, self.ask_ms, self.tell_ms) for n in p.points],
            "ask_ms": self.ask_ms,  # index = trials already in the study when asked
            "tell_ms": self.tell_ms,
            "wall_s": self.wall_s,  # its trials only: ask, writes, tell
            "commits_per_ask": statistics.fmean(self.ask_commits),  # 0 in memory
            "mean_value_first": statistics.fmean(self.values[:10]),  # TPE's random start-up (n_startup_trials)
            "mean_value_last": statistics.fmean(self.values[-tenth:]),
            "best_value": max(self.values),
        }


def _at(n: int, n_trials: int, ask_ms: list[float], tell_ms: list[float]) -> dict[str, Any]:
    """Medians over the w asks made with n .. n+w-1 trials in the study (or the last w)."""
    w = min(n_trials, max(10, n // 10))
    lo = max(0, min(n, n_trials - w))
    hi = lo + w  # exclusive
    return {"n": n, "window": [lo, hi - 1], "ask_ms": statistics.median(ask_ms[lo:hi]),
            "tell_ms": statistics.median(tell_ms[lo:hi]), "ask_ms_min": min(ask_ms[lo:hi]),
            # Other processes only ever add time: the lower quartile is the steadier view on a shared machine.
            "ask_ms_p25": statistics.quantiles(ask_ms[lo:hi], n=4)[0]}


def _commit_ms(folder: Path, n: int = 20) -> float:
    """Median ms of one single-row INSERT + COMMIT on a fresh SQLite file in `folder` (SQLite's defaults)."""
    import sqlite3

    path = folder / "commit-probe.db"
    connection = sqlite3.connect(path)
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS probe (i INTEGER)")
        connection.commit()
        times = []
        for i in range(n):
            started = time.perf_counter()
            connection.execute("INSERT INTO probe VALUES (?)", (i,))
            connection.commit()
            times.append(1000 * (time.perf_counter() - started))
    finally:
        connection.close()
    path.unlink()
    return statistics.median(times)


def _sqlalchemy_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__
