"""MLflow: one experiment per study, one parent run per study version, one child run per trial.

Only the driver process writes here (SQLite has one writer at a time), fed by
what trials report. With a tracking server (`http(s)://`) the server stores the
artifacts too, and MLflow takes its credentials from the environment
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN):
nothing here reads or logs them. Per-epoch metrics are buffered and written with
`log_batch` (one ~70 ms call instead of ~3.5 ms per value).

What MLflow's UI shows (views.py): a child run is renamed at its end to say its state and
objective (`trial-3 · pruned @ epoch 4 · 0.6120`) and gets summary metrics a table sorts on
(`best_<objective>`, `epochs_run`, the test metrics, all at step 0: values, not curves). The
parent run's params are the study as its version started (search space, objective, sampler,
pruner, budget; params cannot change). What a resumed study can change is in tags and metrics:
the best trial (`best.trial`, `best.<key>` per searched key) as tags, rewritten at each end of
the study, and the `best_value` curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from dlsearch.config.spec import StudySpec
from dlsearch.config.stores import is_server, tracking_uri
from dlsearch.config.trial_config import TrialConfig
from dlsearch.protocol import TrialEnd
from dlsearch.tracking.views import TRIALS_VIEW_TAG, study_params, summary_metric, trials_view

# Trial state -> MLflow run status. PRUNED is a normal end (Optuna counts it finished too).
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "INTERRUPTED": "KILLED"}
_FLUSH_EVERY_S = 10.0
# MLflow 3's UI opens an experiment of this kind on its training runs (not on the GenAI overview).
_KIND_TAG = "mlflow.experimentKind"
_KIND = {_KIND_TAG: "custom_model_development"}
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MlflowTracker:
    """Writes a study to MLflow. `open()` first; then per trial `start`, `log_epoch`, `end`."""

    def __init__(self, spec: StudySpec, version: str):
        self.spec = spec
        self.version = version  # the Optuna study name of this version of the study
        self.client = MlflowClient(tracking_uri=tracking_uri(spec.tracking.uri))
        self.experiment_id = ""
        self.parent_run_id = ""
        self.artifact_uri = ""  # the parent run's
        self._buffer: dict[str, list[Metric]] = {}
        self._last_flush = time.monotonic()
        # Per open child run: its name (trial-<n>), the epochs it logged, its best of each objective so far.
        self._names: dict[str, str] = {}
        self._epochs: dict[str, set[int]] = {}
        self._best_seen: dict[str, dict[str, float]] = {}
        self._best_trial: tuple[int, Mapping[str, Any]] | None = None  # the study's, for the parent's tags

    # ------------------------------------------------------------ study

    def find_parent(self) -> Any:
        """This version's parent run, or None (read-only: creates nothing)."""
        experiment = self.client.get_experiment_by_name(self.spec.name)
        if experiment is None:
            return None
        found = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`dlsearch.role` = 'parent' and tags.`dlsearch.version` = '{_quote(self.version)}'",
            max_results=1,
        )
        return found[0] if found else None

    def open(self) -> str:
        """Get or create the experiment and this version's parent run (kept across resumes)."""
        experiment = self.client.get_experiment_by_name(self.spec.name)
        if experiment is None:
            # A tracking server picks the location itself (its artifact store, reached through it):
            # a local folder of the driver would be out of reach of the server and the UI.
            location = None if is_server(self.client.tracking_uri) else (
                (Path(self.spec.tracking.artifacts).resolve() / self.spec.slug).as_uri())
            self.experiment_id = self.client.create_experiment(
                self.spec.name, artifact_location=location, tags={"dlsearch.study": self.spec.name, **_KIND}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.experiment_id)
            if experiment.tags.get(_KIND_TAG) != _KIND[_KIND_TAG]:  # a store written before dlsearch set it
                self.client.set_experiment_tag(self.experiment_id, _KIND_TAG, _KIND[_KIND_TAG])
        # The runs table's view of this version's trials (rewritten: it follows the version that runs).
        self.client.set_experiment_tag(self.experiment_id, TRIALS_VIEW_TAG, trials_view(self.spec, self.version))
        found = self.find_parent()
        if found is not None:
            self.parent_run_id, self.artifact_uri = found.info.run_id, found.info.artifact_uri
            self.client.update_run(self.parent_run_id, status="RUNNING")
            logged = found.data.params  # a version started before dlsearch logged these gets them now
            missing = [Param(k, v) for k, v in study_params(self.spec).items() if k not in logged]
            if missing:
                self.client.log_batch(self.parent_run_id, params=missing[:100])
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=self.version,
                tags={"dlsearch.role": "parent", "dlsearch.version": self.version, "dlsearch.study": self.spec.name},
            )
            self.parent_run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
            params = [Param(k, _param_value(v)) for k, v in study_params(self.spec).items()]
            self.client.log_batch(self.parent_run_id, params=params[:100])  # MLflow's limit per call
            if self.spec.source_text:
                self.client.log_text(self.parent_run_id, self.spec.source_text, "study.yaml")
            self.client.log_dict(self.parent_run_id, self.spec.model_dump(mode="json"), "resolved_spec.yaml")
        return self.parent_run_id

    def reconcile_children(self, outcomes: Mapping[int, tuple[str, str, str | None]]) -> int:
        """Close child runs a killed driver left RUNNING; returns how many.

        `outcomes` maps trial numbers to (state, fail reason, best-weights file) as Optuna
        has them. A child whose trial ended gets that state (and its checkpoint); any
        other was interrupted: KILLED, and its trial runs again.
        """
        stale = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
        )
        for run in stale:
            number = int(run.data.tags.get("dlsearch.trial_number", -1))
            state, reason, best_file = outcomes.get(number, ("INTERRUPTED", "interrupted", None))
            folder = str(Path(best_file).parent) if best_file and Path(best_file).exists() else None
            self.end(run.info.run_id, state, fail_reason=reason, checkpoint_dir=folder)
        return len(stale)

    def log_best(self, value: float, n_finished: int, number: int | None = None,
                 params: Mapping[str, Any] | None = None) -> None:
        """The study's best value so far, one point per finished trial (buffered on the parent run);
        the best trial's `number` and `params` go to the parent's tags when the study ends."""
        self._buffer.setdefault(self.parent_run_id, []).append(Metric("best_value", value, _now_ms(), n_finished))
        if number is not None:
            self._best_trial = (number, dict(params or {}))

    def finish_study(self, artifacts_dir: Path | None, status: str = "FINISHED") -> None:
        """Flush, log the study's artifacts, tag the best trial and its values, set the parent's status."""
        if self._best_trial is not None:
            number, params = self._best_trial
            tags = [RunTag("best.trial", str(number))] + [RunTag(f"best.{k}", _param_value(v)) for k, v in params.items()]
            self.client.log_batch(self.parent_run_id, tags=tags[:100])
        self.flush()
        if artifacts_dir is not None and artifacts_dir.exists():
            self.client.log_artifacts(self.parent_run_id, str(artifacts_dir))
        self.client.set_terminated(self.parent_run_id, status=status)

    # ------------------------------------------------------------ trials

    def start(self, cfg: TrialConfig) -> str:
        """A child run for the trial, with its full configuration as params and artifact."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{cfg.number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "dlsearch.trial_number": str(cfg.number),
                "dlsearch.study": self.spec.name,
                "dlsearch.version": self.version,
                "dlsearch.state": "RUNNING",
            },
        )
        run_id = run.info.run_id
        self._names[run_id] = run.info.run_name
        # A conditional key whose condition does not hold in this trial was never sampled: it is
        # not this trial's param (MLflow's filters and parallel coordinates would show a value).
        inactive = set(self.spec.search) - set(cfg.params)
        params = [Param(k, _param_value(v)) for k, v in cfg.flat().items() if k not in inactive]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        return run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        """Buffer one epoch's metrics (step = epoch); written in batches."""
        ts = _now_ms()
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._buffer.setdefault(run_id, []).extend(Metric(k, v, ts, epoch) for k, v in values.items())
        self._epochs.setdefault(run_id, set()).add(epoch)
        best = self._best_seen.setdefault(run_id, {})
        for o in self.spec.objectives:
            value = values.get(o.metric)
            if value is not None and math.isfinite(value) and (
                    o.metric not in best or (value > best[o.metric]) == (o.direction == "maximize")):
                best[o.metric] = value
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def flush(self, run_id: str | None = None) -> None:
        run_ids = [run_id] if run_id else list(self._buffer)
        for rid in run_ids:
            metrics = self._buffer.pop(rid, [])
            for i in range(0, len(metrics), _BATCH):
                self.client.log_batch(rid, metrics=metrics[i : i + _BATCH])
        self._last_flush = time.monotonic()

    def end(
        self, run_id: str, state: str, *, fail_reason: str = "", final: TrialEnd | None = None,
        checkpoint_dir: str | None = None, node: Mapping[str, str] | None = None, population: Sequence[int] = (),
        terminate: bool = True,
    ) -> None:
        """Close a child run: its buffered curve, test metrics and tags in one `log_batch`, the best
        checkpoint, then (unless `terminate` is False: call `terminate` later) its status.

        `node` is where the trial ran, as its reports said: `node_id` (the Ray node), `node_ip`, `hostname`, the GPUs (`gpu_ids`, `gpu_share`, `gpu_memory_fraction`);
        `population` the trial numbers it trained with as one stacked model (tag `dlsearch.population`).
        """
        final = final or TrialEnd(state=state)
        summary = self._summary(run_id, state, final)
        metrics = self._buffer.pop(run_id, []) + [Metric(k, v, _now_ms(), 0) for k, v in summary.items()]
        tags = [RunTag("dlsearch.state", state)]
        if fail_reason:
            where = f"\n\n{final.traceback}" if final.traceback else ""  # the user's code: where it failed
            tags.append(RunTag("dlsearch.fail_reason", (fail_reason + where)[:5000]))
        if final.overfit_epoch:  # the epoch validation loss turned up while training loss still fell
            tags.append(RunTag("dlsearch.overfit_epoch", str(final.overfit_epoch)))
        if population:
            tags.append(RunTag("dlsearch.population", ",".join(map(str, population))))
        for key, tag in (("node_id", "dlsearch.node"), ("node_ip", "dlsearch.node_ip"),
                         ("hostname", "dlsearch.hostname"), ("gpu_ids", "dlsearch.gpus"),
                         ("gpu_share", "dlsearch.gpu_share"), ("gpu_memory_fraction", "dlsearch.gpu_memory_fraction")):
            if node and node.get(key):
                tags.append(RunTag(tag, node[key]))
        # One write for a curve of up to ~1,000 values (MLflow's limit per batch, tags included).
        last = max(0, len(metrics) - (_BATCH - len(tags)))
        for i in range(0, last, _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : min(i + _BATCH, last)])
        self.client.log_batch(run_id, metrics=metrics[last:], tags=tags)
        name = self._names.pop(run_id, None) or self.client.get_run(run_id).info.run_name.split(" · ")[0]
        values = [summary.get(summary_metric(o)) for o in self.spec.objectives]
        self.client.update_run(run_id, name=_run_name(name, state, int(summary["epochs_run"]), values))
        if checkpoint_dir and Path(checkpoint_dir).is_dir():
            self.client.log_artifacts(run_id, checkpoint_dir, artifact_path="checkpoint")
        if terminate:
            self.terminate(run_id, state)

    def _summary(self, run_id: str, state: str, final: TrialEnd) -> dict[str, float]:
        """A trial's summary metrics: its objective at its best epoch (a complete trial's value; a pruned
        trial's best before it was stopped; none for a failed one), epochs run, test metrics."""
        epochs = self._epochs.pop(run_id, set())
        seen = self._best_seen.pop(run_id, {})
        summary = {"epochs_run": float(final.epochs_run or len(epochs))}
        if state in ("COMPLETE", "PRUNED"):
            for o in self.spec.objectives:
                value = final.best_metrics.get(o.metric, seen.get(o.metric))
                if value is not None:
                    summary[summary_metric(o)] = float(value)
        tests = {"test_loss": final.test_loss, "test_accuracy": final.test_accuracy}
        summary.update({k: float(v) for k, v in tests.items() if v is not None})
        return summary

    def terminate(self, run_id: str, state: str) -> None:
        """Set a child run's status from its dlsearch state (after `end(..., terminate=False)`)."""
        self.client.set_terminated(run_id, status=RUN_STATUS[state])

    def log_artifacts(self, run_id: str, folder: str | Path) -> None:
        """Files a trial logged itself (a custom trainable's `report.log_artifact`), at its run's root."""
        self.client.log_artifacts(run_id, str(folder))

    def register_best(self, run_id: str, model: Any, input_example: Any) -> str | None:
        """Log the best trial's model and register it under the study name with alias `best`.

        `input_example` (a small numpy batch) lets MLflow trace the model and record its signature.
        """
        import mlflow

        mlflow.set_tracking_uri(self.client.tracking_uri)
        # MLflow prints "Successfully registered model ..." itself; the run's summary says it instead.
        with mlflow.start_run(run_id=run_id), contextlib.redirect_stderr(io.StringIO()):
            info = mlflow.pytorch.log_model(
                model.eval(), name="model", registered_model_name=self.spec.name, input_example=input_example,
                pip_requirements=["torch"],  # skips MLflow's slow requirement inference in a subprocess
            )
        version = info.registered_model_version
        if version is None:
            return None
        self.client.set_registered_model_alias(self.spec.name, "best", str(version))
        return str(version)


# The model keys that shape the weights: a source's values replace the study's (dropout, init do not).
ARCHITECTURE_KEYS = ("kind", "depth", "width", "activation", "norm", "channels", "kernel_size", "bidirectional",
                     "heads", "patch_size", "pooling")


def with_source_architecture(spec: StudySpec) -> tuple[StudySpec, dict[str, Any]]:
    """`spec` with the architecture of the MLflow run `model.init_from` names, and what that changed.

    Fine-tuning "the MNIST best" means its depth and width, whatever the search found: they are
    read from the source run's params. A checkpoint file carries no config: the study's model
    section must describe it. Raises SourceError when the source is not there.
    """
    from dlsearch.config.sources import MODEL_URI, RUN_ID

    ref = spec.model.init_from
    if ref is None or not (RUN_ID.match(ref) or MODEL_URI.match(ref)):
        return spec, {}
    client, run_id, _ = _source_run(ref, spec.tracking.uri)
    params = client.get_run(run_id).data.params
    source = {k: yaml.safe_load(params[f"model.{k}"]) for k in ARCHITECTURE_KEYS if f"model.{k}" in params}
    changed = {k: v for k, v in source.items() if getattr(spec.model, k) != v}
    if not changed:
        return spec, {}
    return spec.model_copy(update={"model": spec.model.model_copy(update=changed)}), changed


def with_local_source(cfg: TrialConfig, uri: str) -> TrialConfig:
    """`cfg` with `model.init_from` fetched to a local checkpoint file (from MLflow `uri` when it names a run)."""
    if cfg.model.init_from is None:
        return cfg
    path = fetch_checkpoint(cfg.model.init_from, uri, cfg.base_dir)
    return dataclasses.replace(cfg, model=cfg.model.model_copy(update={"init_from": str(path)}))


def fetch_checkpoint(ref: str, uri: str, base_dir: str | None = None) -> Path:
    """The local file of a `model.init_from` reference: a file as is, a run's or registered model's
    `checkpoint/best.pt` downloaded from MLflow (once per process). Raises SourceError."""
    from dlsearch.config.sources import MODEL_URI, RUN_ID, SourceError, find_file, source_problem

    if RUN_ID.match(ref) or MODEL_URI.match(ref):
        return _download_checkpoint(ref, uri)
    path = find_file(ref, base_dir)
    if path is None:
        raise SourceError(source_problem(ref, base_dir) or f"no checkpoint file {ref!r}")
    return path


@functools.lru_cache(maxsize=8)
def _download_checkpoint(ref: str, uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from dlsearch.config.sources import SourceError

    client, run_id, what = _source_run(ref, uri)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/best.pt",
                                                        tracking_uri=client.tracking_uri)
    except (MlflowException, OSError) as err:
        raise SourceError(f"{what} has no checkpoint/best.pt in {client.tracking_uri} (only complete trials "
                          f"keep one): {str(err).splitlines()[0][:200]}") from None
    return Path(local)


def _source_run(ref: str, uri: str) -> tuple[MlflowClient, str, str]:
    """(client, run id, how to name it) for a run id or a `models:/` reference. Raises SourceError."""
    from mlflow.exceptions import MlflowException

    from dlsearch.config.sources import MODEL_URI, SourceError

    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        if not db.is_file():  # MLflow would create an empty store; say what is missing instead
            raise SourceError(f"{ref} is not in {uri}: there is no MLflow store at {db} yet "
                              "(run the source study first, or give a checkpoint file)")
        uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    match = MODEL_URI.match(ref)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            if match is None:
                return client, client.get_run(ref).info.run_id, f"run {ref}"
            name, alias, version = match["name"], match["alias"], match["version"]
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        hint = (f"run the study {match['name']!r} with tracking.register_best: true first" if match
                else "copy the id from the MLflow UI")
        raise SourceError(f"no {'registered model' if match else 'run'} {ref} in {uri} ({hint})") from None
    return client, found.run_id, f"{ref} (run {found.run_id})"


def _run_name(name: str, state: str, epochs: int, values: Sequence[float | None]) -> str:
    """`trial-3 · pruned @ epoch 4 · 0.6120`: what the runs table shows of a trial without a column."""
    what = {"COMPLETE": "complete", "PRUNED": f"pruned @ epoch {epochs}", "FAIL": "failed",
            "INTERRUPTED": "interrupted"}.get(state, state.lower())
    shown = [f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.4g}" for v in values if v is not None]
    return " · ".join([name, what, *([" / ".join(shown)] if shown else [])])


def _param_value(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _now_ms() -> int:
    return int(time.time() * 1000)
