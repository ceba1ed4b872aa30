"""The tuner: joins where trials run (Ray Tune), what to run and when to stop (Optuna), and MLflow.

`run_study(spec)` runs a study to its budget, or continues it when its Optuna
storage already holds it. The driver process does every Optuna and MLflow
write, fed by what trials report: SQLite has one writer at a time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
from optuna.trial import TrialState

from dlsearch.backend.cluster import check_nodes, excluding, for_workers, runtime_env, usable_resources, worker_env
from dlsearch.config.entrypoints import search_paths
from dlsearch.config.spec import SpecError, StudySpec, search_problems
from dlsearch.config.trial_config import TrialConfig, trial_config
from dlsearch.errors import InterruptedRun, RunError
from dlsearch.protocol import (
    ARTIFACTS_DIR,
    BEST_FILE,
    LAST_FILE,
    MEMBERS_DIR,
    MODEL_DIR,
    PLACE_KEYS,
    Assignment,
    EpochReport,
    Member,
    PopulationEnd,
    PopulationEpoch,
    RoundAnswer,
    TrialEnd,
    from_result,
    resources_scale,
)
from dlsearch.report.leaderboard import ARTIFACT_URI_ATTR
from dlsearch.search.pruning import should_prune
from dlsearch.search.space import directions, make_pruner, make_sampler, suggest
from dlsearch.search.storage import open_storage, study_versions
from dlsearch.tracking.tracker import MlflowTracker, fetch_checkpoint, with_source_architecture
from dlsearch.tuner.preflight import ServiceUnreachable, check_ray_address, check_stores, study_lock

INTERRUPTED = "interrupted"  # fail_reason of trials a killed or stopped driver left running


class Interrupted(InterruptedRun):
    """The run was stopped by SIGINT/SIGTERM after its state was saved (exit 130)."""


class StudyStopped(RunError):
    """The study stopped on a failure that repeats (`resources.stop_after_identical_failures`):
    a configuration error, not a bad trial (exit 1). Its finished trials are saved."""


@dataclass
class TrialRecord:
    """The driver's view of one running trial."""

    number: int
    optuna_trial: optuna.Trial
    cfg: TrialConfig
    run_id: str
    started_s: float = field(default_factory=time.monotonic)
    n_epochs: int = 0  # epochs logged
    last_epoch: int = -1  # the last epoch logged (a custom trainable may count from 0)
    final: TrialEnd | None = None  # the trial's last report
    node: dict[str, str] = field(default_factory=dict)  # where it ran, as its last report said (PLACE_KEYS)
    pruned_at: int | None = None  # the epoch the driver pruned it at
    scale: float = 1  # times the per-trial resources it runs with (doubled after running out of memory)
    population: list[int] = field(default_factory=list)  # the trial numbers it trained with, as one model


@dataclass
class StudySummary:
    """What `dlsearch run` ends with."""

    name: str  # the Optuna study name (the study's version)
    n_complete: int
    n_pruned: int
    n_failed: int
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_test_accuracy: float | None
    parent_run_id: str
    fail_reasons: dict[str, int]
    elapsed_s: float
    epochs_run: int


def run_study(
    spec: StudySpec,
    *,
    trials: int | None = None,
    address: str | None = None,
    fresh: bool = False,
    on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> StudySummary:
    """Run (or continue) the study until `trials` (default `budget.trials`) trials have finished.

    `on_event(kind, info)` receives progress, "start" first and "end" last: "phase" (a line naming
    what the run does now: checking, starting Ray, writing plots, ...), "opened" (the study's
    version and how far it is), "trial_start", "epoch", "trial_retry" (a trial's worker died and
    Tune runs it again), "trial_requeued", "trial_end", "summary" (the result, before the end's
    slow writes). Raises `Interrupted` after saving state on SIGINT/SIGTERM.
    """
    started = time.monotonic()
    _quiet_libraries()
    address = address or spec.resources.address
    if search_problems(spec):  # a study with nothing to search runs with `dlsearch train`
        raise SpecError(search_problems(spec))
    emit = on_event or (lambda kind, info: None)
    emit("start", {"study": spec.name, "budget": trials or spec.budget.trials})
    data = "" if spec.data.dataset == "custom" else f" and loading the data ({spec.data.dataset})"
    emit("phase", {"line": f"checking the study's stores{data}"})
    check_stores(spec)  # before anything is created: a bad store leaves no trace
    check_ray_address(address)
    if spec.data.dataset != "custom":
        from dlsearch.trial.data import load_data

        load_data(spec.data, spec.seed)  # missing or corrupt data fails here (DataError), not in every trial
    for ref in _init_sources(spec):  # a missing source fails here (SourceError, exit 2), not in every trial
        fetch_checkpoint(ref, spec.tracking.uri, str(spec.path.parent) if spec.path else None)
    spec, _ = with_source_architecture(spec)  # fine-tune the source's depth and width, as logged with it
    if _joins_cluster(address):
        # The cluster's node checks may refuse the study (exit 2): before the lock makes any store.
        with _ray_for(spec, address, emit) as avoid, study_lock(spec):
            return _run_opened(spec, _open_study(spec, trials, fresh), started, avoid, emit)
    with study_lock(spec):
        # A local Ray starts (and its workers import torch) while the stores and the parent run are made.
        with ThreadPoolExecutor(1, thread_name_prefix="dlsearch-open") as pool:
            opening = pool.submit(_open_study, spec, trials, fresh)
            with _ray_for(spec, address, emit) as avoid:
                return _run_opened(spec, opening.result(), started, avoid, emit)


def _init_sources(spec: StudySpec) -> list[str]:
    """Every `model.init_from` a trial may use: the fixed one, or the searched choices."""
    dim = spec.search.get("model.init_from")
    refs = list(getattr(dim, "choices", [])) if dim is not None else [spec.model.init_from]
    return [r for r in refs if isinstance(r, str)]


@dataclass
class _Opened:
    """The study's stores, opened for this run: its Optuna study (this version) and MLflow parent run."""

    study: optuna.Study
    tracker: MlflowTracker
    budget: int
    resumed: bool
    fresh: bool
    n_reopened: int  # trials a killed driver left RUNNING, closed and queued again


def _open_study(spec: StudySpec, trials: int | None, fresh: bool) -> _Opened:
    """Open (or create) the study's Optuna study and MLflow parent run; close what a killed driver left."""
    storage = open_storage(spec)
    versions = study_versions(spec, storage)
    version = versions[-1] if versions and not fresh else (
        spec.name if not versions else f"{spec.name}-v{len(versions) + 1}")
    study = optuna.create_study(
        storage=storage, sampler=make_sampler(spec), pruner=make_pruner(spec), study_name=version,
        directions=directions(spec), load_if_exists=True,
    )
    study.set_user_attr("overrides", list(spec.overrides))  # `report` and `best` resolve configs the same way
    names = [o.metric for o in spec.objectives]
    if study.metric_names != names:  # optuna-dashboard then names the objective, not "Objective 0"
        study.set_metric_names(names)
    n_reopened = _close_interrupted(study)
    tracker = MlflowTracker(spec, version)
    tracker.open()
    tracker.reconcile_children(_trial_outcomes(study))
    if study.user_attrs.get(ARTIFACT_URI_ATTR) != tracker.artifact_uri:  # `report` finds the plots without MLflow
        study.set_user_attr(ARTIFACT_URI_ATTR, tracker.artifact_uri)
    return _Opened(study, tracker, trials or spec.budget.trials, resumed=bool(versions) and not fresh,
                   fresh=fresh and bool(versions), n_reopened=n_reopened)


def _run_opened(spec: StudySpec, opened: _Opened, started: float, avoid: list[str],
                on_event: Callable[[str, Mapping[str, Any]], None]) -> StudySummary:
    """Run the opened study to its budget on the Ray `_ray_for` connected to, then write its end."""
    study, tracker, budget = opened.study, opened.tracker, opened.budget
    remaining = budget - len(_finished(study))
    driver = _Driver(spec, study, tracker, on_event, failures=_failure_streak(study))
    finished = _finished(study)
    best = _best_trial(study)
    # The study's totals so far: progress counts on from them, so a resumed run shows the study's.
    driver.emit("opened", {"version": study.study_name, "budget": budget, "remaining": max(0, remaining),
                           "resumed": opened.resumed, "fresh": opened.fresh, "rerun": _n_to_rerun(study),
                           "reopened": opened.n_reopened, "finished": len(finished),
                           **{state.name: sum(t.state == state for t in finished)
                              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
                           "best": best.value if best is not None else None})
    interrupted = False
    if remaining > 0:
        interrupted = _run_on_ray(spec, driver, remaining, avoid)
    summary = _summarize(spec, study, tracker, started, driver.epochs_run)
    if driver.stop_reason:
        tracker.finish_study(None, status="FAILED")  # back to RUNNING when the study resumes
        driver.emit("end", {"summary": summary, "interrupted": False})
        n = summary.n_complete + summary.n_pruned + summary.n_failed
        raise StudyStopped(f"stopped: {driver.stop_reason}; {n} finished trials are saved. Fix the cause and "
                           "rerun the same command to continue (resources.stop_after_identical_failures: 0 "
                           "never stops)")
    if not interrupted:
        from dlsearch.report.leaderboard import write_study_artifacts

        driver.emit("summary", {"summary": summary})  # people read the result before the slow writes
        with _tempdir() as out:
            driver.emit("phase", {"line": "writing the leaderboard, importances and plots to the parent run"})
            write_study_artifacts(spec, study, out)
            if spec.tracking.register_best and summary.best_number is not None and spec.trainable is None:
                driver.emit("phase", {"line": f"registering the best model as {spec.name}@best"})
                driver.register_best()
            tracker.finish_study(out)
    else:
        tracker.finish_study(None, status="KILLED")  # back to RUNNING when the study resumes
    driver.emit("end", {"summary": summary, "interrupted": interrupted})
    if interrupted:
        n = summary.n_complete + summary.n_pruned + summary.n_failed
        # What the resumed run will say it runs again: every trial queued in the study now.
        raise Interrupted(f"stopped: {n} finished trials are saved; {n_will_run_again(_n_to_rerun(study))}")
    return summary


def n_will_run_again(n: int) -> str:
    """How a run says, when stopped and when resumed, how many interrupted trials run again."""
    return f"{n} interrupted trial{'' if n == 1 else 's'} will run again"


def _n_to_rerun(study: optuna.Study) -> int:
    """Trials queued to run again (interrupted, or out of memory): the first a resumed run asks."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# ---------------------------------------------------------------- Ray


@contextmanager
def _ray_for(spec: StudySpec, address: str | None, emit: Callable[[str, Mapping[str, Any]], None]
             ) -> Iterator[list[str]]:
    """Ray for the run: a new local instance, the cluster at `address` (or RAY_ADDRESS), or the Ray
    the caller started (left running). Yields the ids of the nodes trials must avoid.

    On a cluster, every node that can hold a trial first runs `cluster.check_nodes`: a node where
    the data or the entry points do not resolve is named and left out; when no node can, the run
    stops here (SpecError, exit 2), before any store is created.
    """
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # our handler saves state, then exits 130
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # the final report has no epoch metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Trials keep the driver's working directory (Tune would move each into a folder of its own), so
    # relative paths and user modules resolve in a trial as they do in `dlsearch validate`.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # No TensorBoard files (MLflow has the curves): Tune's TensorboardX writer joins a queue thread at
    # exit, which a second Ctrl-C landing inside its put leaves locked, and the CLI then never exits.
    # Its JSON and CSV results stay (`_run_on_ray` asks for them).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from dlsearch.backend.console import quiet_trial_failures

    quiet_trial_failures()  # a dead worker is one line of ours, not Ray's notice and traceback
    started = not ray.is_initialized()
    cluster = started and _joins_cluster(address)
    if started:
        emit("phase", {"line": f"connecting to the Ray cluster at {address or os.environ['RAY_ADDRESS']}" if cluster
                       else "starting Ray on this machine while opening the study's stores"})
        _init_ray(address, runtime_env(spec) if cluster else None)
        if not cluster:
            _warm_workers(ray.cluster_resources().get("CPU", 1), spec.resources.cpus_per_trial)
    try:
        avoid: list[str] = []
        if cluster:
            cpus, gpus, _ = _resources(spec, ray.cluster_resources())
            code_paths = [str(p) for p in search_paths(spec.path.parent if spec.path else None)]
            checks = check_nodes(for_workers(spec), code_paths, cpus, gpus)
            for check in checks:
                if check.problems:
                    emit("warning", {"line": f"{check.line()}; left out of this study"})
                    avoid.append(check.node_id)
            sent = ", ".join(sorted(worker_env())) or "no DLSEARCH_* variable"
            n = len(checks) - len(avoid)
            who = "1 node runs trials; it gets" if n == 1 else f"{n} nodes run trials; they get"
            emit("cluster", {"line": f"cluster: {who} {sent} from this environment (credentials stay here)"})
        yield avoid
    finally:
        if started:
            ray.shutdown()


def _joins_cluster(address: str | None) -> bool:
    """Whether the run joins a Ray cluster (an address, or RAY_ADDRESS in a Ray job) rather than a
    Ray of its own, or one the caller started."""
    import ray

    return not ray.is_initialized() and address != "local" and bool(address or os.environ.get("RAY_ADDRESS"))


def _warm_workers(n_cpus: float, cpus_per_trial: float) -> None:
    """Start as many Ray worker processes as trials can run at once, each importing what a trial
    imports (torch, the loop), without waiting: Ray hands an idle worker to the next actor it
    creates, so Tune's first trials start in a process that is ready."""
    import ray

    from dlsearch.backend.worker import warm_up

    task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(warm_up)
    for _ in range(max(1, int(n_cpus // cpus_per_trial))):
        task.remote()


def _run_on_ray(spec: StudySpec, driver: "_Driver", n_trials: int, avoid: list[str]) -> bool:
    """Dispatch `n_trials` trials on the Ray `_ray_for` connected to, keeping them off the nodes in
    `avoid`; returns True if interrupted by a signal."""
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from dlsearch.backend.scheduler import DriverScheduler
    from dlsearch.backend.board import PruneBoard
    from dlsearch.backend.worker import run_trial

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cpus, gpus_per_trial, concurrency = _resources(spec, usable_resources(avoid))
        if (spec.sampler.model_extra or {}).get("n_startup_trials") == "auto":  # known only now
            driver.study.sampler = make_sampler(spec, min(concurrency, n_trials) * spec.resources.population)
        board_name = ""
        if spec.resources.population > 1:
            board_name = f"dlsearch-prune-board-{os.getpid()}-{time.time_ns()}"
            board = ray.remote(num_cpus=0)(PruneBoard).options(name=board_name).remote()
        driver.dispatch(n_trials, (cpus, gpus_per_trial, usable_resources(avoid).get("CPU", 1)),
                        board_name, board if board_name else None)
        code_paths = [str(p) for p in search_paths(spec.path.parent if spec.path else None)]
        trainable = tune.with_resources(  # a trial retried after running out of memory asks for more
            tune.with_parameters(run_trial, spec=for_workers(spec), code_paths=code_paths),
            functools.partial(_trial_resources, cpus, gpus_per_trial, tuple(avoid)),
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_OptunaSearcher(driver),
                scheduler=DriverScheduler(driver.on_result),
                num_samples=-1,  # the driver's searcher says when the budget is done (FINISHED)
                max_concurrent_trials=min(concurrency, n_trials),
                reuse_actors=True,  # a worker keeps its loaded data across the trials it runs
                time_budget_s=spec.budget.timeout_s,
            ),
            run_config=tune.RunConfig(
                name=f"{spec.slug}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=tune_storage_path(spec),
                verbose=0,
                callbacks=[_DriverCallback(driver), JsonLoggerCallback(), CSVLoggerCallback()],
                stop=_DriverStopper(driver),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:
            driver.emit("phase", {"line": "interrupted: saving the study's state (the running trials run again "
                                          "on resume)"})
            driver.interrupt_running()
            # A trial asked from Optuna whose record the interrupt beat (it stopped the ask halfway)
            # is queued again now, so that the count said now is the one the resumed run says.
            _close_interrupted(driver.study)
            return True
        driver.interrupt_running()  # a trial Tune dropped (e.g. timeout) is closed, not left RUNNING
        return False
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_ray(address: str | None, env: dict[str, Any] | None = None) -> None:
    """Connect to the cluster at `address` (or the one a Ray job runs in: RAY_ADDRESS), else start
    a local Ray on loopback. Token authentication is set up by `check_ray_address`.
    `env` is the runtime environment of a cluster's workers (`cluster.runtime_env`)."""
    import ray

    quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if not address and not os.environ.get("RAY_ADDRESS"):
        # "local": always a new instance of our own; without it ray.init joins any cluster a
        # `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        return
    try:
        ray.init(address=address or None, runtime_env=env, **quiet)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        where = address or os.environ["RAY_ADDRESS"]
        raise ServiceUnreachable(f"resources.address: cannot connect to the Ray cluster at {where} "
                                 f"({str(err).splitlines()[0][:300]})") from None


def tune_storage_path(spec: StudySpec) -> str:
    """Where Tune keeps trial checkpoints: `resources.storage_path` (a folder every node mounts,
    or object storage such as s3://), else beside the artifacts (mlruns/ray for the default store)."""
    path = spec.resources.storage_path
    if path is None:
        return str(Path(spec.tracking.artifacts).resolve().parent / "ray")
    return path if "://" in path else str(Path(path).resolve())


def _quiet_libraries() -> None:
    """Optuna's and MLflow's info lines would interleave with the progress display."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # With a tracking server, MLflow prints a "View run ... at: URL" line for every run it ends.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _resources(spec: StudySpec, cluster: Mapping[str, float]) -> tuple[float, float, int]:
    """CPUs and GPUs per trial, and how many trials run at once."""
    r = spec.resources
    n_cpus, n_gpus = cluster.get("CPU", 1), cluster.get("GPU", 0)
    by_cpu = max(1, int(n_cpus // r.cpus_per_trial))
    concurrency = by_cpu if r.max_concurrent == "auto" else int(r.max_concurrent)
    if r.gpus_per_trial == "auto":
        # Share the visible GPUs among the concurrent trials; small models leave a whole GPU idle.
        gpus = 0.0 if n_gpus == 0 else min(1.0, n_gpus / concurrency)
    else:
        gpus = float(r.gpus_per_trial)
    if gpus > 0:
        concurrency = min(concurrency, max(1, int(n_gpus // gpus)))
    return r.cpus_per_trial, gpus, concurrency


def _trial_resources(cpus: float, gpus: float, avoid: tuple[str, ...], config: Mapping[str, Any]) -> Any:
    """A Tune trial's resources: the study's per-trial share, times `resources_scale` for a trial that
    ran out of memory with fewer (fewer neighbours on the node; a GPU share at most the whole GPU),
    on a node not in `avoid` (nodes the cluster preflight found unable to run trials)."""
    from ray.tune import PlacementGroupFactory

    scale = resources_scale(config)
    return PlacementGroupFactory([{"CPU": cpus * scale, "GPU": min(1.0, gpus * scale) if gpus else 0}],
                                 **excluding(avoid))


def _ray_classes():
    from ray.tune import Callback, Stopper
    from ray.tune.search import Searcher

    return Callback, Searcher, Stopper


_Callback, _Searcher, _Stopper = _ray_classes()


class _DriverBound:
    """Tune pickles its searcher, scheduler and callbacks into its experiment state; the driver
    (Optuna study, MLflow client) stays out of that copy: dlsearch resumes from Optuna, not Tune."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("driver", "_optuna_trial_for")}


class _OptunaSearcher(_DriverBound, _Searcher):
    """Tune's searcher, backed by the driver's Optuna study (define-by-run asks)."""

    def __init__(self, driver: "_Driver"):
        super().__init__()
        self.driver = driver

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.driver.stop_reason:
            return _Searcher.FINISHED
        if self.driver.exhausted:
            # Not FINISHED while trials run: one that runs out of memory is queued again.
            return None if self.driver.running() else _Searcher.FINISHED
        return self.driver.ask(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the driver closes trials in its callback, which sees the checkpoint and the error


class _DriverCallback(_DriverBound, _Callback):
    def __init__(self, driver: "_Driver"):
        self.driver = driver

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cache = Path(self.driver.spec.tracking.artifacts).resolve().parent / "checkpoints" / trial.trial_id
        self.driver.on_complete(trial.trial_id, _local_folder(trial.checkpoint, cache))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = f"the trial's worker failed {trial.num_failures} time(s)"
        error = trial.error_file and Path(trial.error_file)
        if error and error.exists():
            reason += ": " + error.read_text().strip().splitlines()[-1][:300]
        cache = Path(self.driver.spec.tracking.artifacts).resolve().parent / "checkpoints" / trial.trial_id
        self.driver.on_error(trial.trial_id, reason, _local_folder(trial.checkpoint, cache))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        if trial.trial_id in self.driver.populations:  # a population's round: its completed members' weights
            cache = Path(self.driver.spec.tracking.artifacts).resolve().parent / "checkpoints" / trial.trial_id
            self.driver.on_checkpoint(trial.trial_id, _local_folder(checkpoint, cache))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune runs a failed trial again (`resources.max_failures`), from its last checkpoint."""
        saved = getattr(trial, "latest_checkpoint_result", None)
        from_epoch = saved.metrics.get("epoch") if saved is not None and saved.checkpoint is not None else None
        self.driver.on_retry(trial.trial_id, _what_failed(trial), trial.num_failures, trial.max_failures, from_epoch)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.driver.emit("tick", {})


def _what_failed(trial: Any) -> str:
    """A Tune trial's last failure in a few words, from its error file (Ray keeps the traceback there)."""
    error = trial.error_file and Path(trial.error_file)
    text = error.read_text(errors="replace").rpartition("Failure # ")[2] if error and error.exists() else ""
    if "running low on memory" in text:
        return "Ray's memory monitor killed its worker (the node ran low on memory)"
    if "actor died" in text.lower() or "worker process has died" in text:
        return "its worker process died"
    lines = text.strip().splitlines()[1:2]  # the first line after the "Failure # n (occurred at ...)" header
    return f"its worker failed: {lines[0][:200]}" if lines else "its worker failed"


class _DriverStopper(_DriverBound, _Stopper):
    """Ends the experiment when the driver decided the study must stop (a failure that repeats);
    the trials still running are closed as interrupted and run again on resume."""

    def __init__(self, driver: "_Driver"):
        self.driver = driver

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        driver = getattr(self, "driver", None)
        return driver is not None and driver.stop_reason is not None


def _local_folder(checkpoint: Any, cache: Path) -> str | None:
    """A folder on this machine holding the checkpoint: its own on a local or mounted storage path,
    else a copy downloaded from object storage into `cache` (the driver logs and registers from it)."""
    if checkpoint is None:
        return None
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(str(cache))


# ---------------------------------------------------------------- driver


class _Driver:
    """The driver-side state of a running study: asks, tells and tracking writes."""

    def __init__(self, spec: StudySpec, study: optuna.Study, tracker: MlflowTracker,
                 emit: Callable[[str, Mapping[str, Any]], None], failures: tuple[str, int] = ("", 0)):
        self.spec = spec
        self.study = study
        self.tracker = tracker
        self.emit = emit
        self.records: dict[str, TrialRecord] = {}
        # Optuna's pruners take one objective: a multi-objective study runs every trial to its end.
        self.pruning = len(spec.objectives) == 1
        self.metric = spec.objectives[0].metric
        self.epochs_run = 0
        self.n_interrupted = 0
        self.grid_done = False  # the sampler has nothing left to try (a finished grid)
        self.to_ask = 0  # Optuna trials still to ask for this run (`dispatch` sets it)
        self.resources: tuple[float, float, float] = (1, 0, 1)  # CPUs and GPUs per trial, the cluster's CPUs
        # Populations (resources.population > 1): Tune trial id -> its members by trial number;
        # asked trials waiting for a Tune trial of their own; the board their stops go through.
        self.populations: dict[str, dict[int, TrialRecord]] = {}
        self.pending: list[list[TrialRecord]] = []
        self.board: Any = None
        self.board_name = ""
        # Per population: the first member's config and the values newcomers are asked with (its
        # shared keys); the last round answered; a round whose answer waits for its checkpoint, and
        # the members that completed in it, closed once their weights are in (`on_checkpoint`).
        self.references: dict[str, tuple[TrialConfig, dict[str, Any]]] = {}
        self.answered: dict[str, int] = {}
        self.unanswered: dict[str, tuple[int, list[int]]] = {}
        self.awaiting: dict[str, list[TrialRecord]] = {}
        # The reason of the last trials to fail, and how many in a row failed with it (a resumed
        # study goes on counting); a stop decision once `resources.stop_after_identical_failures` did.
        self.failures = failures
        self.stop_reason: str | None = None

    def dispatch(self, n_trials: int, resources: tuple[float, float, float], board_name: str = "",
                 board: Any = None) -> None:
        """Before Tune starts: `n_trials` to ask, the per-trial CPUs and GPUs and the cluster's CPUs,
        and the board a population's prune decisions go through (populations only)."""
        self.to_ask = n_trials
        self.resources = resources
        self.board_name, self.board = board_name, board

    @property
    def exhausted(self) -> bool:
        """Nothing more to ask: the budget is asked (and handed out), or the grid is done."""
        return self.grid_done or (self.to_ask <= 0 and not self.pending)

    def running(self) -> bool:
        return bool(self.records or self.populations)

    def ask(self, tune_trial_id: str) -> dict:
        """The config of Tune trial `tune_trial_id`: one Optuna trial, or a population of them."""
        if self.spec.resources.population > 1:
            return self._ask_population(tune_trial_id)
        record = self._ask_one()
        self.records[tune_trial_id] = record
        return self._single_config(record)

    @staticmethod
    def _single_config(record: TrialRecord) -> dict:
        return Assignment([Member(record.number, dict(record.cfg.params))], resources_scale=record.scale).to_config()

    def _ask_one(self, fixed: Mapping[str, Any] | None = None) -> TrialRecord:
        """Ask Optuna for a trial (with `fixed` params enqueued first) and open its MLflow child run."""
        if fixed:
            self.study.enqueue_trial(dict(fixed), skip_if_exists=False)
        trial = self.study.ask()
        params = suggest(trial, self.spec)
        cfg = trial_config(self.spec, params, trial.number)
        run_id = self.tracker.start(cfg)
        trial.set_user_attr("mlflow_run_id", run_id)
        self.to_ask -= 1
        self.emit("trial_start", {"number": trial.number, "params": params})
        return TrialRecord(trial.number, trial, cfg, run_id, scale=float(trial.user_attrs.get("resources_scale", 1)))

    def _ask_population(self, tune_trial_id: str) -> dict:
        """Up to `resources.population` trials that stack, as one Tune trial.

        The first member samples every searched key; the others get its values of the keys
        members must share (shapes, batch size, schedule, ...: all but `population.VARYING`)
        and sample the rest, so that the population stacks. Trials a population cannot train
        (another optimizer family, a cnn, ...) wait in `pending` for Tune trials of their own.
        Trials queued to run again (interrupted) are asked as they are.
        """
        from dlsearch.trial.population import VARYING, group_stackable

        if not self.pending:
            first = self._ask_one()
            reruns = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            fixed = {} if reruns else {k: v for k, v in first.cfg.params.items() if k not in VARYING}
            asked = [first] + [self._ask_one(fixed) for _ in range(min(self.spec.resources.population, self.to_ask + 1) - 1)]
            self.pending = [[asked[i] for i in group] for group in group_stackable([r.cfg for r in asked])]
        group = self.pending.pop(0)
        if len(group) == 1:
            self.records[tune_trial_id] = group[0]
            return self._single_config(group[0])
        self.populations[tune_trial_id] = {r.number: r for r in group}
        self.references[tune_trial_id] = (group[0].cfg, self._refill_keys(group[0].cfg))
        for r in group:
            r.population = [m.number for m in group]
            r.optuna_trial.set_user_attr("population", r.population)
        return Assignment([Member(r.number, dict(r.cfg.params)) for r in group],
                          resources_scale=max(r.scale for r in group), population=tune_trial_id,
                          board=self.board_name).to_config()

    def on_result(self, tune_trial_id: str, result: Mapping[str, Any]) -> bool:
        """A Tune result of a running trial, as Tune's scheduler sees it first; True: stop it now.

        An epoch (of a single trial, or of each member of a population) goes to `_on_epoch`;
        a trial's last report is kept for `on_complete`. A population is never stopped by Tune:
        each round is answered on the board (`_on_round`: the members to stop, the newcomers),
        which its worker waits for before its next round.
        """
        report = from_result(result)
        node = {k: str(result[k]) for k in PLACE_KEYS if result.get(k)}
        members = self.populations.get(tune_trial_id)
        if members is not None:
            if isinstance(report, PopulationEnd):
                for number, end in report.members.items():
                    if number in members:
                        members[number].final = end
            elif isinstance(report, PopulationEpoch):
                self._on_round(tune_trial_id, report, node)
            return False
        record = self.records.get(tune_trial_id)
        if record is None:
            return False
        if isinstance(report, TrialEnd):
            record.node.update(node)
            record.final = report
            return False
        if isinstance(report, EpochReport):
            return self._on_epoch(record, report.epoch, report.metrics, node)
        return False

    def _on_round(self, tune_trial_id: str, report: PopulationEpoch, node: Mapping[str, str]) -> None:
        """A population's round: each member's epoch to `_on_epoch`; the members that ended or are
        pruned closed (a completed one once its checkpoint is in: `on_checkpoint`); then the
        answer posted (`_answer`). A round a restarted worker repeats was answered already: its
        answer is still on the board (unless it waited for a checkpoint the dead worker never
        handed over)."""
        members = self.populations[tune_trial_id]
        new = report.round > self.answered.get(tune_trial_id, 0)
        stop: list[int] = []
        for number, metrics in report.members.items():
            record = members.get(number)
            if record is None:
                if new:
                    stop.append(number)  # closed here already: a repeated round after a restart must not revive it
                continue
            pruned = self._on_epoch(record, report.epochs.get(number, report.round), metrics, node, tune_trial_id)
            if number in report.ended:
                record.final = report.ended[number]
            elif pruned:
                stop.append(number)
        if not new:
            if tune_trial_id in self.unanswered and not report.checkpointed:
                self._answer(tune_trial_id, *self.unanswered.pop(tune_trial_id))
            return
        self.answered[tune_trial_id] = report.round
        for number in [*report.ended, *stop]:
            record = members.pop(number, None)
            if record is None:
                continue
            if (record.pruned_at is None and report.checkpointed and record.final is not None
                    and record.final.state == "COMPLETE"):
                self.awaiting.setdefault(tune_trial_id, []).append(record)
            else:
                self._close_ended(record, record.pruned_at is not None, None)
        if self.awaiting.get(tune_trial_id):  # newcomers are asked once the completed members are told
            self.unanswered[tune_trial_id] = (report.round, stop)
        else:
            self._answer(tune_trial_id, report.round, stop)

    def on_checkpoint(self, tune_trial_id: str, checkpoint_dir: str | None) -> None:
        """A population's checkpoint is in: close the members that completed in its round (their
        best weights copied out of it, since Tune keeps only a trial's last checkpoint), then answer."""
        for record in self.awaiting.pop(tune_trial_id, []):
            self._close_ended(record, False, self._keep_member_files(tune_trial_id, checkpoint_dir, record.number))
        if tune_trial_id in self.unanswered:
            self._answer(tune_trial_id, *self.unanswered.pop(tune_trial_id))

    def _keep_member_files(self, tune_trial_id: str, checkpoint_dir: str | None, number: int) -> str | None:
        """Member `number`'s files (`model/best.pt`) copied from a population's checkpoint to a folder
        of the driver's own, beside the checkpoint cache: the trial's checkpoint (Optuna's user attr)."""
        source = Path(checkpoint_dir) / MEMBERS_DIR / str(number) if checkpoint_dir else None
        if source is None or not source.is_dir():
            return None
        target = (Path(self.spec.tracking.artifacts).resolve().parent / "checkpoints" / tune_trial_id / MEMBERS_DIR
                  / str(number))
        shutil.copytree(source, target, dirs_exist_ok=True)
        return str(target)

    def _answer(self, tune_trial_id: str, round_: int, stop: list[int]) -> None:
        """Post a round's answer: the members to stop, and newcomers asked for the free slots."""
        members = self.populations.get(tune_trial_id)
        if members is None:
            return
        add = self._refill(tune_trial_id, self.spec.resources.population - len(members))
        if self.board is not None:
            self.board.post.remote(tune_trial_id, round_,
                                   RoundAnswer(stop, [Member(r.number, dict(r.cfg.params)) for r in add]))

    def _refill_keys(self, reference: TrialConfig) -> dict[str, Any]:
        """The values a population's newcomers are asked with: its first member's shared keys and,
        where the search offers optimizers of another family (sgd beside adam), its optimizer, so
        that every newcomer stacks."""
        from dlsearch.trial.population import FAMILIES, VARYING

        fixed = {k: v for k, v in reference.params.items() if k not in VARYING}
        choices = getattr(self.spec.search.get("train.optimizer"), "choices", ())
        if any(FAMILIES.get(c, c) != FAMILIES[reference.train.optimizer] for c in choices):
            fixed["train.optimizer"] = reference.train.optimizer
        return fixed

    def _refill(self, tune_trial_id: str, n_free: int) -> list[TrialRecord]:
        """Up to `n_free` newly asked trials for a population's free slots, while the budget has trials
        to ask: asked with the first member's shared keys (`_refill_keys`), as the first members were.
        One that does not stack all the same (a trial queued to run again, which Optuna hands out
        first) waits in `pending` for a Tune trial of its own."""
        from dlsearch.trial.population import check_stackable

        reference, fixed = self.references[tune_trial_id]
        members = self.populations[tune_trial_id]
        added: list[TrialRecord] = []
        for _ in range(max(0, min(n_free, self.to_ask))):
            if self.grid_done or self.stop_reason:
                break
            record = self._ask_one(fixed)
            try:
                check_stackable([reference, record.cfg])
            except ValueError:
                self.pending.append([record])
                continue
            added.append(record)
        numbers = sorted([*members, *(r.number for r in added)])
        for r in added:
            r.population = numbers
            r.optuna_trial.set_user_attr("population", numbers)
            members[r.number] = r
        return added

    def _on_epoch(self, record: TrialRecord, epoch: int, metrics: Mapping[str, Any], node: Mapping[str, str],
                  population: str = "") -> bool:
        """One epoch of one trial, taken once: its curve to MLflow, its objective to Optuna's pruner.
        True: the trial is pruned (now, or earlier: a restarted worker repeats its epochs)."""
        record.node.update(node)
        if record.pruned_at is not None:
            return True
        if epoch <= record.last_epoch:
            return False  # a worker restarted from an older checkpoint repeats an epoch already logged
        record.last_epoch = epoch
        record.n_epochs += 1
        self.epochs_run += 1
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.tracker.log_epoch(record.run_id, epoch, metrics)
        if self.pruning and should_prune(record.optuna_trial, metrics.get(self.metric), epoch):
            record.pruned_at = epoch
        info = {"number": record.number, "epoch": epoch, "metrics": metrics}
        self.emit("epoch", {**info, "population": population} if population else info)
        return record.pruned_at is not None

    def on_complete(self, tune_trial_id: str, checkpoint_dir: str | None) -> None:
        if tune_trial_id in self.populations:
            for record in self.awaiting.pop(tune_trial_id, []):
                self._close_ended(record, False, self._keep_member_files(tune_trial_id, checkpoint_dir, record.number))
            for record in self.populations.pop(tune_trial_id).values():
                folder = self._keep_member_files(tune_trial_id, checkpoint_dir, record.number)
                self._close_ended(record, record.pruned_at is not None, folder)
            self._forget_population(tune_trial_id)
            return
        record = self.records.pop(tune_trial_id, None)
        if record is None:
            return
        self._close_ended(record, record.pruned_at is not None, checkpoint_dir)

    def _close_ended(self, record: TrialRecord, pruned: bool, checkpoint_dir: str | None) -> None:
        """Close a trial that ended: pruned, else as its final report says."""
        final = record.final or TrialEnd.failed("the trial ended without a final report")
        if final.out_of_memory and self._can_grow(record.scale):
            self._requeue_larger(record, final)
        elif pruned:
            self._close(record, TrialState.PRUNED, "", final, checkpoint_dir=checkpoint_dir)
        elif final.state == "COMPLETE":
            values = [final.best_metrics.get(o.metric) for o in self.spec.objectives]
            if any(v is None or not math.isfinite(v) for v in values):
                self._close(record, TrialState.FAIL, "the objective was never reported", final,
                            checkpoint_dir=checkpoint_dir)
            else:
                self._close(record, TrialState.COMPLETE, "", final, values, checkpoint_dir)
        else:
            reason = final.fail_reason or "the trial ended without a final report"
            self._close(record, TrialState.FAIL, reason, final, checkpoint_dir=checkpoint_dir)

    def _can_grow(self, scale: float) -> bool:
        """Whether a trial given twice `scale` times the per-trial resources still fits a node's share
        (its CPUs at most the cluster's; a GPU share below one whole GPU)."""
        cpus, gpus, n_cpus = self.resources
        return (gpus > 0 and gpus * scale < 1) or (gpus == 0 and cpus * scale * 2 <= n_cpus)

    def _requeue_larger(self, record: TrialRecord, final: TrialEnd) -> None:
        """A trial that ran out of memory: FAIL (not counted in the budget) and queued again with
        twice the resources, so that fewer trials share its node or GPU."""
        scale = record.scale * 2
        reason = (f"out of memory with {record.scale:g}x the per-trial resources; runs again with {scale:g}x "
                  f"(fewer neighbours): {final.fail_reason[:300]}")
        trial = record.optuna_trial
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("requeued", True)
        self.tracker.end(record.run_id, "FAIL", fail_reason=reason, final=final, node=record.node, terminate=False)
        self.study.tell(trial, state=TrialState.FAIL)
        self.tracker.terminate(record.run_id, "FAIL")
        self.study.enqueue_trial(dict(trial.params), user_attrs={"rerun_of": record.number, "resources_scale": scale},
                                 skip_if_exists=False)
        self.to_ask += 1
        self.emit("trial_requeued", {"number": record.number, "reason": reason, "scale": scale})

    def _forget_population(self, tune_trial_id: str) -> None:
        for table in (self.references, self.answered, self.unanswered):
            table.pop(tune_trial_id, None)
        if self.board is not None:
            self.board.forget.remote(tune_trial_id)

    def on_retry(self, tune_trial_id: str, what: str, n_failures: int, max_failures: int,
                 from_epoch: int | None) -> None:
        """Tune runs a trial again after its worker failed (the `n_failures`-th time of at most
        `max_failures`, -1: no limit), from the checkpoint of `from_epoch` (None: from the start)."""
        record = self.records.get(tune_trial_id)
        records = [record] if record is not None else list(self.populations.get(tune_trial_id, {}).values())
        if records:
            self.emit("trial_retry", {"numbers": [r.number for r in records], "what": what,
                                      "last_epoch": max(r.last_epoch for r in records), "retry": n_failures,
                                      "max_retries": max_failures, "from_epoch": from_epoch})

    def on_error(self, tune_trial_id: str, reason: str, checkpoint_dir: str | None = None) -> None:
        records = [*self.awaiting.pop(tune_trial_id, []), *self.populations.pop(tune_trial_id, {}).values()]
        self._forget_population(tune_trial_id)
        record = self.records.pop(tune_trial_id, None)
        for r in records + ([record] if record is not None else []):
            self._close(r, TrialState.FAIL, reason, r.final, checkpoint_dir=checkpoint_dir)

    def interrupt_running(self) -> None:
        """Close trials still running (stopped driver): FAIL `interrupted`, rerun on resume.
        So are trials asked for a population that had not started."""
        running = [*self.records.values(), *(r for p in self.populations.values() for r in p.values()),
                   *(r for group in self.pending for r in group), *(r for a in self.awaiting.values() for r in a)]
        for record in running:
            self.n_interrupted += 1
            _mark_interrupted(self.study, record.optuna_trial.number, record.optuna_trial.params, record.scale)
            self.tracker.end(record.run_id, "INTERRUPTED", fail_reason=INTERRUPTED)
        self.records.clear()
        self.populations.clear()
        self.pending.clear()
        self.awaiting.clear()

    def register_best(self) -> None:
        best = _best_trial(self.study)
        if best is None or "mlflow_run_id" not in best.user_attrs or self.spec.trainable is not None:
            return  # a custom trainable's model is its own: dlsearch cannot rebuild it
        checkpoint = best.user_attrs.get("checkpoint")
        if not checkpoint or not Path(checkpoint).exists():
            return
        import torch

        from dlsearch.trial.data import first_samples, load_data
        from dlsearch.trial.models import build_model
        from dlsearch.trial.practice import n_outputs

        cfg = trial_config(self.spec, best.params, best.number)
        data = load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
        model = build_model(cfg.model, data.input_shape, n_outputs(cfg, data.n_classes), base_dir=cfg.base_dir)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        x, _ = first_samples(data, "test", 2)
        self.tracker.register_best(best.user_attrs["mlflow_run_id"], model, x.numpy())

    def _close(self, record: TrialRecord, state: TrialState, reason: str, final: TrialEnd | None,
               values: list[float] | None = None, checkpoint_dir: str | None = None) -> None:
        trial = record.optuna_trial
        trial.set_user_attr("epochs_run", record.n_epochs)
        for key in ("test_accuracy", "test_loss", "epoch_time_s"):
            if final is not None and getattr(final, key) is not None:
                trial.set_user_attr(key, getattr(final, key))
        if reason:
            trial.set_user_attr("fail_reason", reason)
        model_dir = Path(checkpoint_dir) / MODEL_DIR if checkpoint_dir else None
        if state != TrialState.COMPLETE or model_dir is None or not model_dir.is_dir():
            model_dir = None
        else:
            best_file = model_dir / BEST_FILE
            trial.set_user_attr("checkpoint", str(best_file if best_file.exists() else model_dir / LAST_FILE))
        # Order matters for a driver killed at any moment: the curve, test metrics, tags and files
        # are in MLflow (one log_batch) before Optuna records the end, and the run's status after
        # it; a resume closes a child still RUNNING in MLflow as its Optuna trial says.
        finals = {k: v for k, v in (final.final_metrics if final else {}).items() if v is not None}
        if finals:
            self.tracker.log_epoch(record.run_id, max(record.last_epoch, 0), finals)  # at the last epoch's step
        if checkpoint_dir and (Path(checkpoint_dir) / ARTIFACTS_DIR).is_dir():
            self.tracker.log_artifacts(record.run_id, Path(checkpoint_dir) / ARTIFACTS_DIR)
        name = state.name
        self.tracker.end(record.run_id, name, fail_reason=reason, final=final,
                         checkpoint_dir=str(model_dir) if model_dir else None, node=record.node,
                         population=record.population, terminate=False)
        try:
            self.study.tell(trial, values=values if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as err:
            # The grid sampler calls `study.stop()` once every grid point ran; the state is stored.
            if "Study.stop" not in str(err):
                raise
            self.grid_done = True
        self.tracker.terminate(record.run_id, name)
        self._count_failure(state, reason)
        best = _best_trial(self.study)
        if best is not None and len(self.spec.objectives) == 1:
            self.tracker.log_best(best.value, len(_finished(self.study)), best.number, best.params)
        self.emit("trial_end", {"number": record.number, "state": name, "reason": reason,
                                "value": values[0] if values else None, "epochs": record.n_epochs,
                                "best": best.value if best is not None and len(self.spec.objectives) == 1 else None})


    def _count_failure(self, state: TrialState, reason: str) -> None:
        """A failure that repeats is a configuration error: after k trials in a row fail with the
        same reason, the study stops (`stop_reason`) instead of failing its whole budget."""
        if state != TrialState.FAIL:
            self.failures = ("", 0)
            return
        last, n = self.failures
        self.failures = (reason, n + 1 if reason == last else 1)
        k = self.spec.resources.stop_after_identical_failures
        if k and self.failures[1] >= k and self.stop_reason is None:
            self.stop_reason = f"{self.failures[1]} trials in a row failed with the same reason: {reason}"




def _failure_streak(study: optuna.Study) -> tuple[str, int]:
    """The reason the study's last finished trials failed with, and how many in a row (a resumed
    study goes on counting: rerun unfixed, it stops at the next identical failure)."""
    ended = sorted((t for t in _finished(study) if t.datetime_complete is not None),
                   key=lambda t: t.datetime_complete)
    reason, n = "", 0
    for t in reversed(ended):
        why = str(t.user_attrs.get("fail_reason", "")) if t.state == TrialState.FAIL else None
        if why is None or (n and why != reason):
            break
        reason, n = why, n + 1
    return reason, n


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the budget: every finished one but those a stopped driver interrupted."""
    return [
        t for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and t.user_attrs.get("fail_reason") != INTERRUPTED and not t.user_attrs.get("requeued")
    ]


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None


def _trial_outcomes(study: optuna.Study) -> dict[int, tuple[str, str, str | None]]:
    """Trial number -> (state, fail reason, best-weights file) of every finished trial."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished():
            reason = str(t.user_attrs.get("fail_reason", ""))
            state = "INTERRUPTED" if reason == INTERRUPTED else t.state.name
            out[t.number] = (state, reason, t.user_attrs.get("checkpoint"))
    return out


def _close_interrupted(study: optuna.Study) -> int:
    """Trials a killed driver left RUNNING: FAIL (`interrupted`) and queued to run again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        _mark_interrupted(study, t.number, t.params, float(t.user_attrs.get("resources_scale", 1)))
    return len(stale)


def _mark_interrupted(study: optuna.Study, number: int, params: Mapping[str, Any], scale: float = 1) -> None:
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    study._storage.set_trial_user_attr(trial_id, "fail_reason", INTERRUPTED)
    study.tell(number, state=TrialState.FAIL)
    attrs = {"rerun_of": number} if scale == 1 else {"rerun_of": number, "resources_scale": scale}
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)


def _summarize(spec: StudySpec, study: optuna.Study, tracker: MlflowTracker, started: float,
               epochs_run: int) -> StudySummary:
    trials = _finished(study)
    by_state = {s: [t for t in trials if t.state == s] for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    reasons: dict[str, int] = {}
    for t in by_state[TrialState.FAIL]:
        reason = str(t.user_attrs.get("fail_reason", "unknown"))
        reasons[reason] = reasons.get(reason, 0) + 1
    best = _best_trial(study)
    return StudySummary(
        name=study.study_name,
        n_complete=len(by_state[TrialState.COMPLETE]),
        n_pruned=len(by_state[TrialState.PRUNED]),
        n_failed=len(by_state[TrialState.FAIL]),
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_test_accuracy=best.user_attrs.get("test_accuracy") if best else None,
        parent_run_id=tracker.parent_run_id,
        fail_reasons=reasons,
        elapsed_s=time.monotonic() - started,
        epochs_run=epochs_run,
    )


class _tempdir:
    def __enter__(self) -> Path:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="dlsearch-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()
