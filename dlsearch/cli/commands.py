"""The `dlsearch` command line: parse, call one library function, print.

Exit codes (SPEC): 0 done; 2 the input is wrong; 1 the run could not go on;
130 interrupted after state was saved.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
import time
from typing import Any, Callable

import click
from rich.console import Console

from dlsearch import __version__
from dlsearch.cli.mlflow_ui import serve_ui
from dlsearch.cli.progress import EpochTable, StudyProgress, clock, short_value, sparkline
from dlsearch.config.spec import SpecError, StudySpec, TrackingSpec, load_spec, search_problems
from dlsearch.config.stores import tracking_uri
from dlsearch.config.trial_config import one_run_params, trial_config
from dlsearch.errors import EXIT_FAILED, EXIT_INTERRUPTED, DlsearchError, RunError
from dlsearch.report.leaderboard import (
    IMPORTANCE_EVALUATOR,
    StoredVersion,
    best_config,
    best_study_file,
    load_study,
    stored_versions,
    study_report,
    version_of,
)
from dlsearch.report.plots import ROUGH_IMPORTANCES_BELOW
from dlsearch.trial.data_files import check_data_available

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class RunFailed(RunError):
    """The run could not go on (exit 1): every trial failed, or a service is unreachable."""


def _set_option(f: Callable) -> Callable:
    return click.option(
        "--set", "overrides", multiple=True, metavar="PATH=VALUE",
        help="Override a study key by its dotted path, e.g. --set train.epochs=3 "
        "(VALUE is read as YAML; setting a searched key pins it). Repeatable.",
    )(f)


def _version_option(f: Callable) -> Callable:
    return click.option(
        "--version", "version", type=click.IntRange(min=1), default=None, metavar="N",
        help="Which version of the study: 1 is NAME, 2 is NAME-v2 (what `run --fresh` starts), ...; "
        "default: the newest. `dlsearch studies` lists them.",
    )(f)


def _debug_option(f: Callable) -> Callable:
    return click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")(f)


def _handles_errors(f: Callable) -> Callable:
    """Turn dlsearch's errors into one line each and their exit codes (SPEC); tracebacks only with --debug."""

    @functools.wraps(f)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except DlsearchError as err:
            if debug:
                raise
            for line in err.lines():
                err_console.print(line, markup=False)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dlsearch")
def main() -> None:
    """dlsearch: hyperparameter search for PyTorch on Ray Tune, Optuna and MLflow.

    Write a study file (a search space over learning rate, batch size, depth,
    init, ...), then `dlsearch validate` it, `dlsearch sanity` it, and
    `dlsearch run` it. See studies/ for annotated examples.
    """


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@_debug_option
@_handles_errors
def validate(study: str, overrides: tuple[str, ...]) -> None:
    """Check STUDY and print every problem at once (one line each, exit 2), or `ok` and a summary."""
    spec = load_spec(study, overrides)
    problems = search_problems(spec) + check_data_available(spec.data)
    if problems:
        raise SpecError(problems)
    click.echo(f"ok: {describe(spec)}")


def _trial_zero(spec: Any, console: Console) -> Any:
    """The config of a single in-process trial with the study's fixed values, its `init_from` fetched."""
    if spec.model.init_from is None:
        return trial_config(spec, one_run_params(spec), number=0)
    from dlsearch.tracking.tracker import with_local_source, with_source_architecture  # MLflow (~2 s): init_from only

    spec, changed = with_source_architecture(spec)
    if changed:
        shown = ", ".join(f"{k} {v}" for k, v in changed.items())
        console.print(f"model: {shown} (the architecture of {spec.model.init_from})", markup=False)
    return with_local_source(trial_config(spec, one_run_params(spec), number=0), spec.tracking.uri)


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (progress goes to stderr).")
@_debug_option
@_handles_errors
def train(study: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Run one trial in-process with the study's fixed values: no search, no Ray, no tracking.

    For debugging and for measuring the training loop. Prints a row per epoch,
    then the best epoch and the test metrics of its weights; --json gives
    state, epochs_run, best_epoch, best_metrics, test_accuracy, test_loss and
    the median epoch_time_s.
    """
    from dlsearch.trial.custom_trainable import run_custom_trainable  # torch: only the commands that train import it
    from dlsearch.trial.data import load_data
    from dlsearch.trial.train import train_trial

    spec = load_spec(study, overrides)
    console = err_console if as_json else Console(highlight=False, soft_wrap=True)
    cfg = _trial_zero(spec, console)
    data = None if cfg.trainable else load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
    with EpochTable(console, title=f"{spec.name}: one trial, {cfg.train.epochs} epochs max") as table:
        if data is None:
            result = run_custom_trainable(
                cfg, table.add, on_artifact=lambda path: err_console.print(f"artifact (not kept by train): {path}",
                                                                           markup=False))
        else:
            result = train_trial(cfg, data, table.add)
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        console.print(describe_result(summary), markup=False)
    if result.state == "FAIL":
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--samples", default=64, show_default=True, help="Size of the tiny subset to overfit.")
@click.option("--steps", default=200, show_default=True, help="Full-batch optimizer steps on it.")
@_debug_option
@_handles_errors
def sanity(study: str, overrides: tuple[str, ...], samples: int, steps: int) -> None:
    """Can this model learn at all? Run the debugging playbook's first checks on STUDY's fixed values.

    Loss at init near ln(classes), gradients in every layer, overfitting a tiny
    subset with regularization off, and a finite loss. Prints each check with
    the number behind it and the loss curve; exit 1 if any check fails.
    """
    from dlsearch.trial.data import load_data  # torch: only the commands that train import it
    from dlsearch.trial.sanity import run_sanity

    spec = load_spec(study, overrides)
    if spec.trainable is not None:
        raise SpecError([f"trainable: sanity checks the built-in training loop; this study replaces it with "
                         f"{spec.trainable} (run `dlsearch train` instead)"])
    console = Console(highlight=False, soft_wrap=True)
    cfg = _trial_zero(spec, console)
    data = load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
    result = run_sanity(cfg, data, n_samples=samples, n_steps=steps)
    for check in result.checks:
        mark = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
        console.print(f"{mark} {check.name}: ", end="")
        console.print(check.detail, markup=False)
    console.print(f"loss curve ({len(result.losses)} steps): ", end="")
    console.print(sparkline(result.losses), markup=False)
    console.print("[green]sanity passed[/]" if result.passed else "[red]sanity failed[/]")
    if not result.passed:
        sys.exit(EXIT_FAILED)


def describe(spec: Any, trials: int | None = None) -> str:
    """A one-paragraph summary of a resolved study (what `validate` prints); `trials` is the budget
    `run --trials` gives instead of the file's."""
    n_cond = sum(1 for d in spec.search.values() if d.when)
    m = spec.model
    model = f"{m.kind} depth {m.depth} width {m.width}" if m.kind != "custom" else f"custom {m.factory or ''}".strip()
    if spec.trainable:
        model += f", trainable {spec.trainable}"
    objectives = ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)
    pins = f"; set on the command line: {', '.join(o.split('=')[0] for o in spec.overrides)}" if spec.overrides else ""
    return (
        f"{spec.name}: dataset {spec.data.dataset}, model {model}, "
        f"{len(spec.search)} search dimensions ({n_cond} conditional), "
        f"sampler {spec.sampler.type}, pruner {spec.pruner.type}, "
        f"{trials or spec.budget.trials} trials x <= {spec.train.epochs} epochs, objective {objectives}{pins}"
    )


def describe_result(summary: dict[str, Any]) -> str:
    if summary["state"] == "FAIL":
        return f"FAIL after {summary['epochs_run']} epochs: {summary['fail_reason']}"
    best = summary["best_metrics"]
    shown = [k for k in ("val_accuracy", "val_loss") if k in best] or [k for k in best if k != "epoch_time_s"][:3]
    text = (f"COMPLETE: {summary['epochs_run']} epochs, best epoch {summary['best_epoch']} "
            f"({', '.join(f'{k} {best[k]:.4f}' for k in shown)})")
    tests = [f"{k} {summary[k]:.4f}" for k in ("test_accuracy", "test_loss") if summary.get(k) is not None]
    tests += [f"{k} {v:.4g}" for k, v in summary.get("final_metrics", {}).items()]
    if tests:
        text += "; " + ", ".join(tests)
    if summary.get("epoch_time_s") is not None:
        text += f"; median epoch {summary['epoch_time_s']:.2f} s"
    return text


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--trials", type=click.IntRange(min=1), help="Total trials to finish (overrides budget.trials; "
              "on a rerun, raising it extends the study).")
@click.option("--address", help="Ray cluster to run on (auto | host:port | ray://host:10001); "
              "default: resources.address, else a local Ray on 127.0.0.1.")
@click.option("--fresh", is_flag=True, help="Start over under a new version of the study (name-v2, ...) "
              "instead of continuing the stored one.")
@_debug_option
@_handles_errors
def run(study: str, overrides: tuple[str, ...], trials: int | None, address: str | None, fresh: bool) -> None:
    """Run STUDY on Ray Tune with Optuna sampling and pruning, tracking every trial in MLflow.

    If the study's Optuna storage already holds it, the run continues it to its
    budget: finished trials are kept, interrupted ones run again. Shows live
    progress and ends with the best trial and the command that opens the UI.
    Exit 0 when done (some failed trials included), 1 if every trial failed or
    resources.stop_after_identical_failures trials in a row failed with the same
    reason, 2 for bad input, 130 when stopped by Ctrl-C or SIGTERM after saving state.
    """
    started = time.monotonic()
    spec = load_spec(study, overrides)
    problems = check_data_available(spec.data)
    if problems:
        raise SpecError(problems)
    console = Console(highlight=False, soft_wrap=True)
    # The header first: what follows imports Ray and MLflow (seconds on a small machine).
    console.print(f"study {describe(spec, trials)}", markup=False)
    progress = StudyProgress(console, spec.objectives[0].metric, started=started)
    progress.on_summary = functools.partial(_print_summary, console, spec, progress)
    progress("phase", {"line": "importing Ray Tune and MLflow"})
    from dlsearch.tuner.runner import Interrupted, run_study  # Ray, MLflow: seconds, only `run` needs them

    try:
        summary = run_study(spec, trials=trials, address=address, fresh=fresh, on_event=progress)
    except Interrupted as err:
        progress.close()
        err_console.print(f"{err}; {_to_continue(study, overrides, trials, address, fresh)}", markup=False)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        progress.close()  # a second Ctrl-C may come while the table is live: its border ends its line
    if summary.best_number is None:
        reasons = "; ".join(f"{r} (x{c})" for r, c in summary.fail_reasons.items())
        raise RunFailed(f"every trial failed: {reasons}")
    console.print(f"compare the trials:  dlsearch ui {study}", markup=False)
    console.print(f"leaderboard:         dlsearch report {study}", markup=False)


def _to_continue(study: str, overrides: tuple[str, ...], trials: int | None, address: str | None,
                 fresh: bool) -> str:
    """The command that continues a stopped run: the same one, but never with --fresh (that would
    start yet another version instead of continuing the one just stopped)."""
    command = ["dlsearch", "run", study, *(x for o in overrides for x in ("--set", o))]
    command += ["--trials", str(trials)] if trials else []
    command += ["--address", address] if address else []
    if fresh:
        return f"to continue this version, run it without --fresh: {shlex.join(command)}"
    return f"rerun the same command to continue: {shlex.join(command)}"


def _print_summary(console: Console, spec: StudySpec, progress: StudyProgress, summary: Any) -> None:
    """The study's result, printed as soon as its trials are done (the plots and registry come after).
    Its counts are the study's, as the progress showed them; time and epochs are this run's."""
    n = summary.n_complete + summary.n_pruned + summary.n_failed
    line = (f"\n{summary.name}: {n} trials finished ({summary.n_complete} complete, {summary.n_pruned} pruned, "
            f"{summary.n_failed} failed)")
    this_run = f"in {progress.elapsed_s():.0f} s, {summary.epochs_run} epochs trained"
    if progress.finished_before:  # a resumed study: its totals, then what this run added to them
        line += f"; {n - progress.finished_before} of them in this run, {this_run}"
    else:
        line += f" {this_run}"
    console.print(line, markup=False)
    if summary.best_number is None:
        return
    test = f", test_accuracy {summary.best_test_accuracy:.4f}" if summary.best_test_accuracy is not None else ""
    console.print(f"best: trial {summary.best_number}, {spec.objectives[0].metric} {summary.best_value:.4f}{test}",
                  markup=False)
    for key, value in summary.best_params.items():
        console.print(f"  {key} = {value}", markup=False)


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show only the N best trials.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="Leaderboard format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@_version_option
@_debug_option
@_handles_errors
def report(study: str, overrides: tuple[str, ...], top: int | None, fmt: str, as_json: bool,
           version: int | None) -> None:
    """Leaderboard of STUDY's trials (state, value, epochs run, params), parameter importances,
    and where the study's plots are."""
    spec, optuna_study = _study_as_run(study, overrides, version)
    found = study_report(spec, optuna_study)
    table = found.leaderboard.head(top) if top else found.leaderboard
    if as_json or fmt == "json":
        click.echo(json.dumps({"study": found.study_name, "trials": table.records(),
                               "importances": found.importances, "plots": found.plots}, indent=2))
        return
    if fmt == "csv":
        click.echo(table.csv(), nl=False)
        return
    if fmt == "markdown":
        click.echo(table.markdown())
    else:
        click.echo(f"{found.study_name}: {len(optuna_study.trials)} trials")
        click.echo(table.text())
    if found.importances:
        n_complete = sum(t.state.name == "COMPLETE" for t in optuna_study.trials)
        rough = (f"; with fewer than {ROUGH_IMPORTANCES_BELOW}, read them as rough"
                 if n_complete < ROUGH_IMPORTANCES_BELOW else "")
        click.echo(f"\nparameter importances ({IMPORTANCE_EVALUATOR}, from {n_complete} complete trials{rough}):")
        for key, value in found.importances.items():
            click.echo(f"  {key:<28} {value:6.3f} {'#' * int(round(value * 40))}")
    if found.plots:
        click.echo("\nplots:")
        for path in found.plots:
            click.echo(f"  {path}")


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--json", "as_json", is_flag=True,
              help="Print trial, value, params and the full config as JSON, with the version's study name "
              "and number.")
@_version_option
@_debug_option
@_handles_errors
def best(study: str, overrides: tuple[str, ...], as_json: bool, version: int | None) -> None:
    """The best trial as a study file: STUDY as it ran, with the best trial's values fixed.

    `validate` accepts it and `run` / `train` take it: dlsearch best STUDY > best.yaml, then
    dlsearch run best.yaml --set budget.trials=1 trains the best configuration again (a new study).
    """
    spec, optuna_study = _study_as_run(study, overrides, version)
    if len(optuna_study.directions) > 1:
        raise RunFailed(f"{optuna_study.study_name} has {len(optuna_study.directions)} objectives, so no single "
                        f"best trial; `dlsearch report` ranks them")
    try:
        if as_json:
            found = best_config(spec, optuna_study)
            found["study"], found["version"] = optuna_study.study_name, version_of(spec, optuna_study)
            click.echo(json.dumps(found, indent=2, default=str))
        else:
            click.echo(best_study_file(spec, optuna_study, study), nl=False)
    except ValueError:  # Optuna's best_trial, before any trial completed
        raise RunFailed(f"{optuna_study.study_name} has no complete trial yet") from None


@main.command()
@click.argument("study", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the versions as a JSON list.")
@_debug_option
@_handles_errors
def studies(study: str | None, as_json: bool) -> None:
    """The studies and their versions in STUDY's Optuna store (tracking.optuna_storage), or in the
    default store sqlite:///mlruns/optuna.db of this directory: trials by state, best value, last update.

    `report` and `best` take --version N for the versions listed here.
    """
    url = load_spec(study).tracking.optuna_storage if study else TrackingSpec().optuna_storage
    found = stored_versions(url)
    if as_json:
        click.echo(json.dumps([v.record() for v in found], indent=2))
    elif not found:
        click.echo(f"no studies in {url}")
    else:
        # As wide as the table needs (as `report` prints its leaderboard): rich would squeeze it into 80
        # columns when stdout is not a terminal.
        click.echo(f"studies in {url}")
        Console(highlight=False, width=10_000).print(_studies_table(found))


def _studies_table(found: list[StoredVersion]) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for name, justify in [("study", "left"), ("version", "right"), ("complete", "right"),
                          ("pruned", "right"), ("failed", "right"), ("running", "right"), ("objective", "left"),
                          ("best", "right"), ("trial", "right"), ("last update", "left")]:
        table.add_column(name, justify=justify, no_wrap=True)
    for v in found:
        n = v.n_trials
        table.add_row(v.study, str(v.version), str(n.get("COMPLETE", 0)), str(n.get("PRUNED", 0)),
                      str(n.get("FAIL", 0)), str(n.get("RUNNING", 0) + n.get("WAITING", 0)), ", ".join(v.objectives),
                      "" if v.best_value is None else f"{v.best_value:.4f}",
                      "" if v.best_trial is None else str(v.best_trial),
                      v.last_update.strftime("%Y-%m-%d %H:%M:%S") if v.last_update else "")
    return table


@main.command()
@click.argument("study", required=False, type=click.Path(dir_okay=False))
@click.option("--port", default=5000, show_default=True, help="Port of the MLflow UI.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; the default keeps the UI on this machine (loopback).")
@click.option("--uri", default=None, help="Tracking URI (default: STUDY's tracking.uri, else sqlite:///mlruns/mlflow.db).")
@_debug_option
@_handles_errors
def ui(study: str | None, port: int, host: str, uri: str | None) -> None:
    """Start the MLflow UI on STUDY's tracking store: parent run per study, child run per trial.

    Prints the UI's URL once it answers (a few seconds) and runs until Ctrl-C.
    """
    spec = load_spec(study) if study else None
    tracking = spec.tracking if spec else TrackingSpec()
    backend = tracking_uri(uri or tracking.uri)
    if backend.startswith(("http://", "https://")):
        click.echo(f"the study's tracking server serves its UI: open {backend} in a browser")
        return
    sys.exit(serve_ui(backend, host, port, out=Console(highlight=False, soft_wrap=True), progress=err_console,
                      study=spec.name if spec else None))


@main.command()
@click.argument("study", type=click.Path(dir_okay=False))
@_set_option
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Trials that run at once on the simulated clock (the GPUs or nodes you would use).")
@click.option("--trials", type=click.IntRange(min=1), help="Trials to ask (default: budget.trials).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_debug_option
@_handles_errors
def simulate(study: str, overrides: tuple[str, ...], workers: int, trials: int | None, as_json: bool) -> None:
    """Try the study's sampler and pruner on recorded curves, on a simulated clock: nothing is written.

    The driver of `dlsearch run` asks, prunes and tells as in a real run, with WORKERS trials at
    once; each trial's `trainable` runs here to its end, and the epochs it reports replay in
    simulated time (each its reported epoch_time_s). Meant for trainables that replay recorded
    curves (e.g. `bench.lcbench_surrogate:replay`, LCBench's): compare `--set pruner.type=...`
    before spending GPUs on a study.
    """
    from dlsearch.tuner.simulate import simulate_study, trainable_curves

    spec = load_spec(study, overrides)
    if spec.trainable is None:
        raise SpecError([f"{study}: trainable: simulate replays the curves a trainable reports; this study "
                         "trains the built-in model (run it with dlsearch run)"])
    started = time.perf_counter()
    sim = simulate_study(spec, trainable_curves(spec), workers, trials=trials or spec.budget.trials)
    states = [t.state.name for t in sim.study.get_trials(deepcopy=False)]
    objective = spec.objectives[0]
    complete = [t for t in sim.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = (max if objective.direction == "maximize" else min)(complete, key=lambda t: t.values[0], default=None)
    anytime = {}
    for share in (0.25, 0.5, 1.0):
        seen = [e.value for e in sim.epochs[: max(1, round(share * sim.epochs_run))] if e.value is not None]
        anytime[f"{int(share * 100)}%"] = (max if objective.direction == "maximize" else min)(seen) if seen else None
    result = {
        "study": spec.name, "workers": workers, "trials": len(states),
        "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
        "epochs_run": sim.epochs_run, "simulated_s": sim.time_s, "wall_s": time.perf_counter() - started,
        "best_trial": best.number if best else None, "best_value": best.values[0] if best else None,
        "best_params": dict(best.params) if best else {},
        "best_seen_at_share_of_epochs": anytime,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{spec.name}: {len(states)} trials on {workers} simulated worker{'s' if workers > 1 else ''} ("
               f"{result['complete']} complete, "
               f"{result['pruned']} pruned, {result['failed']} failed), {sim.epochs_run} epochs in "
               f"{clock(sim.time_s)} of simulated time ({result['wall_s']:.1f} s here); sampler "
               f"{spec.sampler.type}, pruner {spec.pruner.type}")
    if best is not None:
        values = ", ".join(f"{k}={short_value(v)}" for k, v in best.params.items())
        click.echo(f"best: trial {best.number}, {objective.metric} {best.values[0]:.4f} ({values})")
    click.echo(f"best {objective.metric} seen after 25% / 50% / 100% of the epochs: "
               + " / ".join("-" if v is None else f"{v:.4f}" for v in anytime.values()))
    click.echo("nothing was written; to run it: dlsearch run " + shlex.join([study, *_set_args(overrides)]))


def _set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _study_as_run(study: str, overrides: tuple[str, ...], version: int | None = None) -> tuple[StudySpec, Any]:
    """The spec with the `--set` overrides the study was run with (then these), and its Optuna study
    (version `version`, default the newest)."""
    spec = load_spec(study, overrides)
    try:
        optuna_study = load_study(spec, version)
    except KeyError as err:
        raise RunFailed(str(err.args[0])) from None
    stored = tuple(optuna_study.user_attrs.get("overrides", ()))
    if stored:
        spec = load_spec(study, stored + tuple(overrides))
    return spec, optuna_study
