"""The plain Optuna script a user writes instead of `dlsearch run`: the same study, no Ray, no tracking.

`python -m bench.plain_optuna STUDY.yaml [--set PATH=VALUE ...] [--n-jobs N]` runs STUDY's search
with Optuna alone, in this process, and prints the trials, the best value and the epochs trained.

What it shares with `dlsearch run`, so that the two do the same work:

- the study file, read by `dlsearch.config.spec.load_spec` (with the same `--set` overrides);
- the data: `dlsearch.trial.data.load_data(spec.data, spec.seed)`, loaded once (same split);
- the search space (`dlsearch.search.space.suggest`, define-by-run), the sampler and pruner
  (`make_sampler`: same type, options and seed; `make_pruner`), the objective's direction;
- the training: `dlsearch.trial.train.train_trial` on the trial's config
  (`dlsearch.config.trial_config.trial_config`: same trial seed from the trial number), with a
  report callable that calls `trial.report(value, step=epoch)` and raises `optuna.TrialPruned`
  when `trial.should_prune()` says so. The same loop on both sides is the fair choice here: this
  script stands for the framework a user does without (Ray, MLflow, stores), and `bench/loop.py`
  measures dlsearch's loop against a bare one on its own (equal within noise). It also builds
  the same checkpoint dict every epoch, which it drops.

What it does not do: tracking, checkpoint files, resume, any storage but Optuna's in-memory one,
processes. `--n-jobs N` runs N trials at once in threads (`study.optimize(n_jobs=N)`); then each
trial's torch uses cpu_count // N intra-op threads, as dlsearch gives each of its N concurrent
trials cpu_count // N CPUs (with one job, torch keeps its default: every core).
A trial whose loss diverges returns NaN, which Optuna records as FAIL (dlsearch fails it too).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time

import optuna
import torch

from dlsearch.config.spec import load_spec
from dlsearch.config.trial_config import trial_config
from dlsearch.search.space import directions, make_pruner, make_sampler, suggest
from dlsearch.trial.data import load_data
from dlsearch.trial.train import train_trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_optuna", description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--n-jobs", type=int, default=1, help="trials at once, in threads (default 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    spec = load_spec(args.study, args.overrides)
    data = load_data(spec.data, spec.seed)
    metric = spec.objectives[0].metric
    threads = max(1, (os.cpu_count() or 1) // args.n_jobs) if args.n_jobs > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    epochs: list[int] = []  # one entry per epoch trained, from any thread
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        torch.set_num_threads(threads)  # per thread: OpenMP keeps the setting per calling thread
        cfg = trial_config(spec, suggest(trial, spec), trial.number)

        def report(epoch: int, metrics: dict, checkpoint: dict | None = None) -> None:
            with lock:
                epochs.append(epoch)
            trial.report(float(metrics[metric]), step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        result = train_trial(cfg, data, report)
        return float(result.best_metrics[metric]) if result.state == "COMPLETE" else math.nan

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(spec), pruner=make_pruner(spec),
                                directions=directions(spec), study_name=spec.name)
    study.optimize(objective, n_trials=spec.budget.trials, n_jobs=args.n_jobs)

    states = [t.state for t in study.trials]
    n = {s: states.count(s) for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                      optuna.trial.TrialState.FAIL)}
    print(f"{spec.name}: {len(states)} trials finished ({n[optuna.trial.TrialState.COMPLETE]} complete, "
          f"{n[optuna.trial.TrialState.PRUNED]} pruned, {n[optuna.trial.TrialState.FAIL]} failed) in "
          f"{time.perf_counter() - started:.0f} s, {len(epochs)} epochs trained")
    best = study.best_trials[0] if len(spec.objectives) > 1 else study.best_trial
    print(f"best: trial {best.number}, {metric} {best.values[0]:.4f}")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
