"""The Ray Tune + Optuna + MLflow script a user glues by hand instead of `dlsearch run`.

`python -m bench.glued_ray STUDY.yaml [--set PATH=VALUE ...] [--max-concurrent N] [--store DIR]`
runs STUDY's search from the libraries' own documented integrations and prints the trials, the
best value and the epochs trained:

- `ray.init(address="local")` (a Ray of its own on this machine), shut down at the end;
- `tune.Tuner` with Tune's defaults otherwise (a fresh actor, so a fresh worker process, per
  trial: `reuse_actors` is off for function trainables), `max_concurrent_trials=N`, 1 CPU each;
- `ray.tune.search.optuna.OptunaSearch(space, metric, mode, sampler=TPESampler(seed=...))`: the
  study's define-by-run space through `dlsearch.search.space.suggest`, its sampler options and seed;
- `ray.tune.schedulers.ASHAScheduler` as the early stopper (Tune's documented pairing with
  OptunaSearch: Ray's Optuna integration does not run Optuna's pruners), over the study's epochs,
  grace period 1 and reduction factor 3 (Optuna's Hyperband defaults);
- `ray.air.integrations.mlflow.MLflowLoggerCallback` to a SQLite store in `--store` (default: a
  temporary folder), one MLflow run per trial with its params and per-epoch metrics;
- a function trainable that loads the data (`dlsearch.trial.data.load_data(spec.data, spec.seed)`:
  the same split) and runs `dlsearch.trial.train.train_trial` on the trial's config
  (`dlsearch.config.trial_config.trial_config`: same trial seed from the trial number), calling
  `ray.tune.report` once per epoch; no checkpoints.

A trial's value in the printout is its best epoch's objective, as dlsearch and Optuna count it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class Space:
    """The define-by-run search space (a class: Tune pickles its searcher's state)."""

    def __init__(self, spec: Any):
        self.spec = spec

    def __call__(self, trial: Any) -> dict[str, Any]:
        from dlsearch.search.space import suggest

        suggest(trial, self.spec)  # OptunaSearch takes the suggestions as the trial's config
        return {"number": trial.number}  # the trial seed derives from it, as in dlsearch


def trainable(config: dict[str, Any], spec: Any) -> None:
    """Tune function trainable: the trial's config, the study's data, one `tune.report` per epoch."""
    from ray import tune

    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.data import load_data
    from dlsearch.trial.train import train_trial

    params = {k: v for k, v in config.items() if k != "number"}
    cfg = trial_config(spec, params, int(config["number"]))
    data = load_data(cfg.data, cfg.data_seed)
    train_trial(cfg, data, lambda epoch, metrics, checkpoint=None: tune.report({**metrics, "epoch": epoch}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.glued_ray", description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2)")
    parser.add_argument("--store", help="folder for the MLflow store and Tune's files (default: a temporary one)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="glued-ray-") as tmp:
        return run(args, Path(args.store or tmp), started)


def run(args: argparse.Namespace, folder: Path, started: float) -> int:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    import optuna
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dlsearch.config.spec import load_spec
    from dlsearch.search.build import resolve_startup

    spec = load_spec(args.study, args.overrides)
    objective = spec.objectives[0]
    mode = "max" if objective.direction == "maximize" else "min"
    ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, spec=spec), {"cpu": 1}),
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(
                    space=Space(spec), metric=objective.metric, mode=mode,
                    sampler=optuna.samplers.TPESampler(
                        seed=spec.seed, **resolve_startup(dict(spec.sampler.model_extra or {}), args.max_concurrent)),
                ),
                scheduler=ASHAScheduler(metric=objective.metric, mode=mode, time_attr="epoch",
                                        max_t=spec.train.epochs, grace_period=1, reduction_factor=3),
                num_samples=spec.budget.trials,
                max_concurrent_trials=args.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name="glued", storage_path=str(folder / "ray"), verbose=0,
                callbacks=[MLflowLoggerCallback(tracking_uri=f"sqlite:///{folder}/mlflow.db",
                                                experiment_name=spec.name, save_artifact=False)],
            ),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    curves = [r.metrics_dataframe for r in grid]
    n_epochs = sum(len(c) if c is not None else 0 for c in curves)
    best = [(c[objective.metric].max() if mode == "max" else c[objective.metric].min(), i)
            for i, c in enumerate(curves) if c is not None and objective.metric in c]
    n_full = sum(1 for c in curves if c is not None and len(c) and c["epoch"].max() >= spec.train.epochs)
    print(f"{spec.name}: {len(grid)} trials finished ({grid.num_errors} failed; {n_full} ran all "
          f"{spec.train.epochs} epochs) in {time.perf_counter() - started:.0f} s, {n_epochs} epochs trained")
    if best:
        value, i = max(best) if mode == "max" else min(best)
        config = grid[i].config
        print(f"best: trial {config['number']}, {objective.metric} {value:.4f}")
        for key, v in config.items():
            if key != "number":
                print(f"  {key} = {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
