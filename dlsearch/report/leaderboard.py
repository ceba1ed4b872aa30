"""A study's results for people: the leaderboard, parameter importances, plots, the best trial as a
study file, and the versions of the studies in a store.

Everything here reads the Optuna storage (the source of truth for trial states and values)
and, for what a run logged when it ended, the MLflow store; nothing here writes to either.
`dlsearch report`, `best` and `studies` load only Optuna: MLflow, matplotlib and scikit-learn (behind
Optuna's importance module) take seconds to import and are loaded only where needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import optuna
import yaml
from optuna.trial import TrialState

from dlsearch.config.spec import StudySpec
from dlsearch.config.stores import tracking_uri
from dlsearch.config.trial_config import pinned_study, trial_config
from dlsearch.errors import InputError
from dlsearch.report import plots
from dlsearch.report.plots import PLOTS
from dlsearch.search.storage import open_storage, study_versions

IMPORTANCE_EVALUATOR = "PED-ANOVA"  # the evaluator `importances` asks Optuna for (see _evaluator)
# The Optuna study's user attribute holding its MLflow parent run's artifact URI (set by the driver).
ARTIFACT_URI_ATTR = "mlflow_artifact_uri"
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
_PARAM_PREFIX = "params."


@dataclass(frozen=True)
class Leaderboard:
    """One row per trial, best first; columns `number, state, value (value_<i> for several objectives),
    epochs, test_accuracy, duration_s, fail_reason`, then `params.<path>` per searched key (None where
    a trial has no value, e.g. a conditional key whose condition did not hold)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def head(self, n: int) -> Leaderboard:
        return Leaderboard(self.columns, self.rows[:n])

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts for JSON (non-finite numbers become None)."""
        return [{c: _json_value(v) for c, v in zip(self.columns, row)} for row in self.rows]

    def csv(self) -> str:
        """Every column, params with their `params.` prefix; empty cells for None."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(["" if v is None else v for v in row] for row in self.rows)
        return out.getvalue()

    def text(self) -> str:
        """Aligned columns for a terminal: numbers right-aligned with 4 significant digits."""
        columns, cells, numeric = self._display()
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

        def line(values: list[str]) -> str:
            return "  ".join(v.rjust(w) if num else v.ljust(w)
                             for v, w, num in zip(values, widths, numeric)).rstrip()

        return "\n".join([line(columns)] + [line(row) for row in cells])

    def markdown(self) -> str:
        """A Markdown (pipe) table of the same columns and cells as `text`."""
        columns, cells, numeric = self._display()

        def line(values: list[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

        return "\n".join([line(columns), line(["---:" if num else ":---" for num in numeric])]
                         + [line(row) for row in cells])

    def _display(self) -> tuple[list[str], list[list[str]], list[bool]]:
        """Columns without the `params.` prefix and with fail_reason last (the widest; left out when empty),
        the cells as text, and which columns hold numbers."""
        order = [i for i, c in enumerate(self.columns) if c != "fail_reason"]
        if "fail_reason" in self.columns:
            reason = self.columns.index("fail_reason")
            order += [reason] if any(row[reason] for row in self.rows) else []
        columns = [self.columns[i].removeprefix(_PARAM_PREFIX) for i in order]
        cells = [[_cell(row[i]) for i in order] for row in self.rows]
        numeric = [all(_is_number(row[i]) for row in self.rows if row[i] is not None) for i in order]
        return columns, cells, numeric


@dataclass(frozen=True)
class StudyReport:
    """What `dlsearch report` shows: the leaderboard, parameter importances and the plots' paths."""

    study_name: str
    leaderboard: Leaderboard
    importances: dict[str, float]
    plots: list[str]


class UnknownVersion(InputError):
    """`--version N` names a version of the study that its store does not hold (exit 2)."""


@dataclass(frozen=True)
class StoredVersion:
    """One version of a study in an Optuna store, as `dlsearch studies` lists it."""

    study: str  # the study's name, as its file gives it
    version: int  # 1 for `study`, N for `study-vN`
    optuna_name: str
    n_trials: dict[str, int]  # by state: COMPLETE, PRUNED, FAIL, RUNNING, WAITING (only those present)
    objectives: tuple[str, ...]  # "maximize val_accuracy", one per objective
    best_value: float | None  # None with no complete trial, or several objectives
    best_trial: int | None
    last_update: datetime | None  # when its newest trial finished (or started, while it runs)

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (the timestamp in ISO 8601)."""
        return {"study": self.study, "version": self.version, "optuna_name": self.optuna_name,
                "n_trials": self.n_trials, "objectives": list(self.objectives),
                "best_value": _json_value(self.best_value), "best_trial": self.best_trial,
                "last_update": self.last_update.isoformat(timespec="seconds") if self.last_update else None}


def load_study(spec: StudySpec, version: int | None = None) -> optuna.Study:
    """Version `version` of the study from its Optuna storage: 1 is `name`, 2 is `name-v2`, ...; the
    newest by default. KeyError (SpecError-free) when the store holds no version of it; UnknownVersion,
    naming the versions it does hold, when it lacks that one."""
    storage = open_storage(spec)
    versions = study_versions(spec, storage)
    if not versions:
        raise KeyError(f"no study named {spec.name!r} in {spec.tracking.optuna_storage}; run it first")
    if version is not None and not 1 <= version <= len(versions):
        held = ", ".join(f"{n} ({name})" for n, name in enumerate(versions, start=1))
        raise UnknownVersion(f"--version {version}: {spec.name} has no version {version} in "
                             f"{spec.tracking.optuna_storage}; it has {held}")
    return optuna.load_study(study_name=versions[(version or len(versions)) - 1], storage=storage)


def version_of(spec: StudySpec, study: optuna.Study) -> int:
    """The version number of `study`, a version of `spec`'s study: 1 for `name`, N for `name-vN`."""
    suffix = study.study_name.removeprefix(spec.name)
    return int(suffix[2:]) if suffix.startswith("-v") and suffix[2:].isdigit() else 1


def stored_versions(storage_url: str) -> list[StoredVersion]:
    """Every version of every study in the Optuna store at `storage_url`, by study name and version.

    `name-vN` (N >= 2) is version N of `name` when the store holds `name`; any other study is version 1
    of itself. A SQLite file that does not exist holds nothing (and is not created).
    """
    path = _sqlite_path(storage_url)
    if path is not None and not path.exists():
        return []
    url = tracking_uri(storage_url)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                         if url.startswith("sqlite:") else {})
    names = set(optuna.get_all_study_names(storage))
    found = []
    for name in names:
        match = re.fullmatch(r"(.+)-v([0-9]+)", name)
        study, version = (match[1], int(match[2])) if match and match[1] in names and int(match[2]) >= 2 else (name, 1)
        found.append(_stored_version(optuna.load_study(study_name=name, storage=storage), study, version))
    return sorted(found, key=lambda v: (v.study, v.version))


def study_report(spec: StudySpec, study: optuna.Study) -> StudyReport:
    """The leaderboard, importances (those the run logged when the study has not changed since) and plots."""
    table = leaderboard(study)
    logged = logged_artifacts(spec, study)
    return StudyReport(study.study_name, table, current_importances(study, table, logged), plot_paths(logged))


def leaderboard(study: optuna.Study) -> Leaderboard:
    """Every trial of `study`, best first: complete, then pruned, failed, running, waiting; by value within each."""
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    value_columns = ["value"] if len(maximize) == 1 else [f"value_{i}" for i in range(len(maximize))]
    records = []
    for t in study.get_trials(deepcopy=False):
        record: dict[str, Any] = {"number": t.number, "state": t.state.name}
        record.update(zip(value_columns, t.values or [None] * len(maximize)))
        record["epochs"] = t.user_attrs.get("epochs_run", len(t.intermediate_values))
        record["test_accuracy"] = t.user_attrs.get("test_accuracy")
        record["duration_s"] = t.duration.total_seconds() if t.duration else None
        record["fail_reason"] = t.user_attrs.get("fail_reason", "")
        record.update({f"{_PARAM_PREFIX}{k}": v for k, v in t.params.items()})
        records.append(record)
    if not records:
        return Leaderboard((), ())

    def rank(record: dict[str, Any]) -> tuple[int, bool, float]:
        value = record[value_columns[0]]
        missing = value is None or math.isnan(value)
        return _STATE_ORDER.get(record["state"], 9), missing, 0.0 if missing else (-value if maximize[0] else value)

    records.sort(key=rank)  # stable: trials of equal rank stay in number order
    columns = tuple(dict.fromkeys(c for record in records for c in record))
    return Leaderboard(columns, tuple(tuple(record.get(c) for c in columns) for record in records))


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA) over complete trials; empty when too few."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or len(study.directions) > 1:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=_evaluator()))
    except (RuntimeError, ValueError):
        return {}  # e.g. every complete trial has the same params


def current_importances(study: optuna.Study, table: Leaderboard, logged: Path | None) -> dict[str, float]:
    """`importances(study)`, read from the importances.json that the run logged in `logged` when it ended
    if the leaderboard.csv logged beside it equals `table` (no trial changed since), else computed.

    Reading them back saves `report` about 1.5 s: Optuna's importance module imports scikit-learn
    (for fANOVA) even to run PED-ANOVA. The numbers are the same: PED-ANOVA is deterministic.
    """
    if logged is not None:
        try:
            if (logged / "leaderboard.csv").read_text() == table.csv():
                stored = json.loads((logged / "importances.json").read_text())
                return {str(k): float(v) for k, v in stored.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # missing or not what write_study_artifacts writes: compute them
    return importances(study)


def logged_artifacts(spec: StudySpec, study: optuna.Study) -> Path | None:
    """The local folder of the artifacts on this study version's MLflow parent run (the study file, and
    what a run logs when it ends: leaderboard.csv, importances.json, the plots), or None: no parent run
    yet, or its artifacts live on a tracking server."""
    uri = _parent_artifact_uri(spec, study)
    if uri is None or not uri.startswith("file:"):
        return None
    folder = Path(unquote(urlparse(uri).path))
    return folder if folder.is_dir() else None


def plot_paths(logged: Path | None) -> list[str]:
    """The paths of the plots in `logged` (see `logged_artifacts`), in PLOTS order."""
    if logged is None:
        return []
    return [str(logged / name) for name in PLOTS if (logged / name).exists()]


def best_config(spec: StudySpec, study: optuna.Study) -> dict[str, Any]:
    """The best trial's full resolved configuration, as sections a study file or --set can take."""
    best = study.best_trial
    cfg = trial_config(spec, best.params, best.number).to_dict()
    return {
        "trial": best.number,
        "value": best.value,
        "objective": spec.objectives[0].metric,
        "test_accuracy": best.user_attrs.get("test_accuracy"),
        "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
        "params": dict(best.params),
        "config": {k: cfg[k] for k in ("data", "model", "train")},
    }


def best_study_file(spec: StudySpec, study: optuna.Study, source: str) -> str:
    """`dlsearch best`: the best trial as a study file that `validate` accepts and `run` / `train` take.

    The study as it ran (the `--set` overrides it was run with applied), its best trial's values fixed
    (`pinned_study`), renamed `<version>-trial-<n>` so that `run` starts a new study instead of
    continuing this one, under a header saying where it comes from and how to run it. `source` is the
    study file as the user named it, for the commands in the header.
    """
    best = study.best_trial
    name = f"{study.study_name}-trial-{best.number}"
    metric = spec.objectives[0].metric
    pins = " ".join(f"--set {o}" for o in spec.overrides)
    pinned = pinned_study(spec, best.params, name)
    left = [k for k in pinned["search"] if k not in best.params]
    same_seed = best.number == 0
    about = (
        f"The study as it ran{f' ({pins})' if pins else ''} with the trial's values fixed: in their sections, and "
        f"in search as one-choice keys (run needs a search{'; still searched: ' + ', '.join(left) if left else ''}). "
        f"Renamed, so that run starts a new study instead of continuing {study.study_name}. Same seed, so the "
        f"same train/val split; a trial's own seed (init, shuffling, dropout) comes from its number, so trial 0 "
        + ("here draws the seed trial 0 did: expect the same value." if same_seed else
           f"here draws another than trial {best.number} did: expect {metric} within seed noise of "
           f"{best.value:.4f}, not to the digit.")
    )
    if spec.trainable or spec.data.factory or spec.model.factory:
        about += (f" Entry points are looked for beside the study file: save this file in "
                  f"{spec.path.parent if spec.path else 'its folder'}.")
    test_accuracy = best.user_attrs.get("test_accuracy")
    test = f", test_accuracy {test_accuracy:.4f}" if test_accuracy is not None else ""
    run_id = best.user_attrs.get("mlflow_run_id")
    lines = [
        f"{name}: the best trial of {study.study_name} (version {version_of(spec, study)}), from {source}",
        f"  trial {best.number}: {metric} {best.value:.4f}{test}" + (f" (MLflow run {run_id})" if run_id else ""),
        *textwrap.wrap(about, width=106),
        "",
        f"Save:  dlsearch best {source} > best.yaml",
        "Run:   dlsearch run best.yaml --set budget.trials=1",
        "       dlsearch train best.yaml      (one trial in-process: no Ray, no tracking)",
    ]
    header = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return header + "\n" + _study_yaml(pinned)


def write_study_artifacts(spec: StudySpec, study: optuna.Study, out: Path) -> list[Path]:
    """Leaderboard CSV, importances JSON and the study's plots (PNG) into `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    found = importances(study)
    (out / "leaderboard.csv").write_text(leaderboard(study).csv())
    (out / "importances.json").write_text(json.dumps(found, indent=2))
    return [out / "leaderboard.csv", out / "importances.json"] + plots.write_plots(
        spec, study, out, found, IMPORTANCE_EVALUATOR)


def write_plots(spec: StudySpec, study: optuna.Study, out: Path) -> list[Path]:
    """The study's plots (`dlsearch.report.plots`) into `out`, with the importances computed here."""
    return plots.write_plots(spec, study, out, importances(study), IMPORTANCE_EVALUATOR)


def _evaluator() -> Any:
    # Named, not Optuna's default: the label `report` prints stays true whatever the default becomes.
    return optuna.importance.PedAnovaImportanceEvaluator()


def _parent_artifact_uri(spec: StudySpec, study: optuna.Study) -> str | None:
    """The artifact URI of the version's parent run: recorded in the Optuna study when the run opened it
    (`ARTIFACT_URI_ATTR`), else (a study run before dlsearch recorded it) asked of MLflow."""
    if ARTIFACT_URI_ATTR in study.user_attrs:
        return str(study.user_attrs[ARTIFACT_URI_ATTR])
    from dlsearch.tracking.tracker import MlflowTracker  # MLflow: ~2 s to import and open; only older studies

    run = MlflowTracker(spec, study.study_name).find_parent()
    return run.info.artifact_uri if run is not None else None


class _StudyDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing `_Flow` mappings on one line (`{type: float, low: 0, high: 1}`)."""


class _Flow(dict):
    """A mapping written in flow style."""


_StudyDumper.add_representer(
    _Flow, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True))
_BLOCK_SECTIONS = ("data", "model", "train", "search", "resources", "tracking")  # one key a line, as studies/ write them


def _study_yaml(study: dict[str, Any]) -> str:
    """A study dict as the files in studies/ write it: a mapping of plain values on one line (search
    dimensions, `objective`, `early_stopping`), the sections one key a line, set apart by blank lines."""

    def styled(node: Any, block: bool) -> Any:
        if not isinstance(node, dict):
            return node
        inner = {k: styled(v, False) for k, v in node.items()}
        return inner if block or any(isinstance(v, dict) for v in node.values()) else _Flow(inner)

    out, after_block = [], False
    for key, value in study.items():
        block = key in _BLOCK_SECTIONS
        text = yaml.dump({key: styled(value, block)}, Dumper=_StudyDumper, sort_keys=False,
                         default_flow_style=False, width=120)
        out.append(("\n" if block or after_block else "") + text)
        after_block = block
    return "".join(out)


def _stored_version(study: optuna.Study, name: str, version: int) -> StoredVersion:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    metrics = study.metric_names or [None] * len(study.directions)
    objectives = tuple(f"{d.name.lower()} {m}" if m else d.name.lower() for d, m in zip(study.directions, metrics))
    best = None
    if len(study.directions) == 1 and states["COMPLETE"]:
        best = study.best_trial
    times = [t.datetime_complete or t.datetime_start for t in trials if t.datetime_complete or t.datetime_start]
    return StoredVersion(
        study=name, version=version, optuna_name=study.study_name,
        n_trials={s: states[s] for s in _STATE_ORDER if states[s]},
        objectives=objectives, best_value=best.value if best else None, best_trial=best.number if best else None,
        last_update=max(times) if times else None,
    )


def _sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///` URL (relative to the cwd unless absolute), else None."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///"):])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
