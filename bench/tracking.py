"""How much of a study's time goes to MLflow tracking, and why dlsearch batches its writes.

Goal: the driver's per-trial MLflow writes take at most 1% of the trials' in-trial time.

Part 1 runs a digits study (studies/digits.yaml as shipped: its own budget, epochs and median
pruner; every store in a temporary folder) through `run_study` with `dlsearch.tracking.tracker.MlflowTracker`
instrumented from here: every public method is wrapped in a stopwatch on the class for the
duration of the run (dlsearch itself is unchanged; a call made from inside another timed call,
such as `end` flushing, counts once). The calls fall in two groups:

- per study: `open` (experiment, parent run, study.yaml), `find_parent`, `reconcile_children`,
  `finish_study` (leaderboard and plots as artifacts) and `register_best` (the best model into
  the registry);
- per trial, every other public method: `start` (child run, params, config.yaml), `log_epoch`
  (buffers; flushes every 10 s), `flush`, `end` (curves, test metrics, tags, checkpoint
  artifact, status), `log_best`, and any the tracker has gained since.

The share is write time / the sum of every trial's epochs' `epoch_time_s` (the same in-trial
time as `bench/overhead.py`). Both groups are reported; the goal is judged on the per-trial
writes, which grow with the study, while the per-study ones are paid once whatever its length.

Part 2 shows why the tracker buffers an epoch's metrics and writes them with `log_batch`: on a
fresh SQLite store it times one `log_batch` of N metric values against N `log_metric` calls
(N = 1,000, MLflow's limit per batch; 200 with --quick), after one untimed write of each kind.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from bench import REPO, load_1min, machine, ray_session, store_overrides, versions

HEADING = "## Tracking cost: MLflow writes per trial, and log_batch vs log_metric (`bench/tracking.py`)"
GOAL_SHARE = 0.01  # the per-trial MLflow writes / in-trial time
STUDY = "studies/digits.yaml"
PER_STUDY = ("open", "find_parent", "reconcile_children", "finish_study", "register_best")


def overrides(quick: bool) -> list[str]:
    """On top of the study file (besides the stores): a couple of short trials for --quick."""
    return ["budget.trials=2", "train.epochs=2", "tracking.register_best=false"] if quick else []


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        study = _study_share(Path(tmp) / "study", overrides(quick))
        batch = _batch_vs_single(Path(tmp) / "batch", 200 if quick else 1000)
    share = study["per_trial_write_s"] / study["in_trial_s"]
    return {
        "study": STUDY,
        "overrides": overrides(quick),
        "goal_share": GOAL_SHARE,
        "machine": machine(),
        "versions": versions(),
        **study,
        "share_per_trial_writes": share,
        "share_all_writes": (study["per_trial_write_s"] + study["per_study_write_s"]) / study["in_trial_s"],
        "met": share <= GOAL_SHARE,
        "batch": batch,
    }


def summary(result: dict[str, Any]) -> list[str]:
    b = result["batch"]
    return [
        f"tracking: {result['n_trials']} digits trials, {result['n_epochs']} epochs, in-trial "
        f"{result['in_trial_s']:.2f} s; per-trial MLflow writes {result['per_trial_write_s']:.2f} s "
        f"({1000 * result['per_trial_write_s'] / result['n_trials']:.0f} ms/trial) = "
        f"{100 * result['share_per_trial_writes']:.1f}% of in-trial time (goal <= {100 * result['goal_share']:.0f}%: "
        f"{'met' if result['met'] else 'NOT met'}); with the per-study writes ({result['per_study_write_s']:.2f} s) "
        f"{100 * result['share_all_writes']:.1f}%; load {result['load_1min']:.1f}",
        f"  {b['n_values']} metric values on SQLite: one log_batch {1000 * b['batch_s']:.0f} ms, "
        f"{b['n_values']} log_metric calls {b['single_s']:.2f} s ({1000 * b['single_s'] / b['n_values']:.1f} ms each): "
        f"batching is {b['single_s'] / b['batch_s']:.0f}x faster",
    ]


def markdown(result: dict[str, Any]) -> str:
    m, v, b = result["machine"], result["versions"], result["batch"]
    n = result["n_trials"]
    rows = ["| method | per | calls | total s | ms per call |", "|---|---|---:|---:|---:|"]
    per_trial = sorted(set(result["calls"]) - set(PER_STUDY), key=lambda k: (-result["calls"][k], k))
    for name in (*per_trial, *PER_STUDY):
        calls, seconds = result["calls"].get(name, 0), result["seconds"].get(name, 0.0)
        if calls:
            group = "study" if name in PER_STUDY else "trial"
            rows.append(f"| `{name}` | {group} | {calls} | {seconds:.3f} | {1000 * seconds / calls:.1f} |")
    goal = [
        "| figure | value |",
        "|---|---:|",
        f"| trials / epochs trained | {n} / {result['n_epochs']} |",
        f"| Σ in-trial time (epoch_time_s) | {result['in_trial_s']:.2f} s |",
        f"| per-trial MLflow writes | {result['per_trial_write_s']:.2f} s "
        f"({1000 * result['per_trial_write_s'] / n:.0f} ms per trial) |",
        f"| **share of in-trial time (goal ≤ {100 * result['goal_share']:.0f}%)** | "
        f"**{100 * result['share_per_trial_writes']:.1f}%, met: {'yes' if result['met'] else 'no'}** |",
        f"| per-study MLflow writes (once per study) | {result['per_study_write_s']:.2f} s |",
        f"| share with the per-study writes | {100 * result['share_all_writes']:.1f}% |",
        f"| study wall time | {result['wall_s']:.1f} s |",
    ]
    batch = [
        "| write | values | seconds | ms per value |",
        "|---|---:|---:|---:|",
        f"| one `log_batch` | {b['n_values']} | {b['batch_s']:.3f} | {1000 * b['batch_s'] / b['n_values']:.2f} |",
        f"| `log_metric` per value | {b['n_values']} | {b['single_s']:.3f} | {1000 * b['single_s'] / b['n_values']:.2f} |",
    ]
    busy = result["load_1min"] > (m["cpu_count"] or 1)
    shared = (f" The machine was shared while it ran (1-minute load average {result['load_1min']:.1f} before the "
              f"study on {m['cpu_count']} CPUs), which slows the writes and the epochs alike." if busy else "")
    per_epoch_ms = 1000 * result["in_trial_s"] / max(1, result["n_epochs"])
    return (
        "Time the driver spends in MLflow writes during a study, against the trials' in-trial time "
        "(Σ `epoch_time_s`), measured by wrapping every public method of `MlflowTracker` in a stopwatch "
        "for the run (`python -m bench tracking`; nested calls count once). Per-trial writes grow with "
        "the study; per-study writes are paid once. The module docstring of `bench/tracking.py` lists "
        "what each method writes.\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; MLflow {v['mlflow']} on SQLite, "
        f"Ray {v['ray']}, Optuna {v['optuna']}, torch {v['torch']}. Study: {result['study']}"
        + (f" with {' '.join('--set ' + o for o in result['overrides'])}" if result["overrides"] else " as shipped")
        + ", every store in a temporary folder.\n\n"
        + "\n".join(goal) + "\n\n" + "\n".join(rows)
        + f"\n\nA digits epoch is short (mean {per_epoch_ms:.0f} ms here), so the share is the worst case for "
        "the same writes: per trial they cost the same whatever the model, and an MNIST epoch takes seconds.\n\n"
        "Why the tracker batches: the same number of metric values written to a fresh SQLite store as one "
        "`log_batch` and as one `log_metric` call each (after one untimed write of each kind):\n\n"
        + "\n".join(batch)
        + f"\n\nBatching is {b['single_s'] / b['batch_s']:.0f}× faster here. Raw numbers: `bench/out/tracking.json`."
        + shared
    )


# ---------------------------------------------------------------- measuring


def _study_share(folder: Path, extra: list[str]) -> dict[str, Any]:
    from dlsearch.tuner.runner import run_study
    from dlsearch.config.spec import load_spec

    spec = load_spec(REPO / STUDY, [*extra, *store_overrides(folder)])
    epoch_s: list[float] = []

    def on_event(kind: str, info: Mapping[str, Any]) -> None:
        if kind == "epoch":
            epoch_s.append(float(info["metrics"]["epoch_time_s"]))

    with ray_session(), _timed_tracker() as clock:
        load = load_1min()
        started = time.perf_counter()
        summary = run_study(spec, on_event=on_event)
        wall_s = time.perf_counter() - started
    return {
        "n_trials": summary.n_complete + summary.n_pruned + summary.n_failed,
        "n_pruned": summary.n_pruned,
        "n_epochs": len(epoch_s),
        "in_trial_s": sum(epoch_s),
        "wall_s": wall_s,
        "load_1min": load,
        "calls": dict(clock.calls),
        "seconds": dict(clock.seconds),
        "per_trial_write_s": sum(v for k, v in clock.seconds.items() if k not in PER_STUDY),
        "per_study_write_s": sum(v for k, v in clock.seconds.items() if k in PER_STUDY),
    }


class _Clock:
    """Seconds and calls per tracker method; only the outermost of nested calls is counted."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                    self.calls[name] = self.calls.get(name, 0) + 1

        return timed


@contextmanager
def _timed_tracker() -> Iterator[_Clock]:
    """Every public `MlflowTracker` method timed while the block runs (only the driver calls them)."""
    from dlsearch.tracking.tracker import MlflowTracker

    clock = _Clock()
    originals = {name: method for name, method in vars(MlflowTracker).items()
                 if inspect.isfunction(method) and not name.startswith("_")}  # plain methods only
    for name, method in originals.items():
        setattr(MlflowTracker, name, clock.wrap(name, method))
    try:
        yield clock
    finally:
        for name, method in originals.items():
            setattr(MlflowTracker, name, method)


def _batch_vs_single(folder: Path, n_values: int) -> dict[str, Any]:
    """One `log_batch` of `n_values` metric values vs `n_values` `log_metric` calls, on fresh SQLite."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    folder.mkdir(parents=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.create_experiment("bench-batch", artifact_location=(folder / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("warm_batch", 0.0, now_ms, 0)])  # untimed: first-write costs
    client.log_metric(run_id, "warm_single", 0.0, step=0)

    metrics = [Metric("batched", float(i), now_ms, i) for i in range(n_values)]
    started = time.perf_counter()
    client.log_batch(run_id, metrics=metrics)
    batch_s = time.perf_counter() - started

    started = time.perf_counter()
    for i in range(n_values):
        client.log_metric(run_id, "single", float(i), timestamp=now_ms, step=i)
    single_s = time.perf_counter() - started

    stored = {k: len(client.get_metric_history(run_id, k)) for k in ("batched", "single")}
    if stored != {"batched": n_values, "single": n_values}:
        raise RuntimeError(f"expected {n_values} values of each metric in the store, found {stored}")
    return {"n_values": n_values, "batch_s": batch_s, "single_s": single_s}
