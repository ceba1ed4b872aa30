"""What a Ray cluster's nodes get from the driver, and the check each node passes before the first trial.

Workers of a cluster started with `ray start` keep the environment of that command, not the
driver's. So the driver sends what resolves a study on a node:

- every `DLSEARCH_*` variable of its environment (`DLSEARCH_DATA_DIR` made absolute), through
  Ray's runtime environment (`env_vars`);
- the study's data paths (`data.root`, `data.path`) made absolute against its working directory;
- the study's own code (`working_dir`, `py_modules`: `cluster_runtime_env`).

Credentials never travel: MLflow's (`MLFLOW_TRACKING_*`), PostgreSQL's (`PGPASSWORD`) and
Ray's (`RAY_AUTH_TOKEN`) stay with the driver, the only process that writes to the stores.

Before the first trial, `check_nodes` runs one small task on every node that can hold a trial;
it checks that the data and the entry points resolve there. A node that cannot is named in one
line and left out of the study (through a label selector on the trials' placement groups);
when no node can, the run stops as bad input before anything is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dlsearch.config.entrypoints import local_code
from dlsearch.config.spec import SpecError, StudySpec

FORWARDED_PREFIX = "DLSEARCH_"
PATH_VARIABLES = ("DLSEARCH_DATA_DIR",)  # relative to the driver's working directory: sent absolute
NODE_CHECK_TIMEOUT_S = 180  # a node's first task waits for its worker and the study folder's upload
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: what trials are kept off nodes by


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables every trial gets on a cluster: `DLSEARCH_*`, paths made absolute."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, value in environ.items():
        if name.startswith(FORWARDED_PREFIX) and value:
            out[name] = os.path.abspath(os.path.expanduser(value)) if name in PATH_VARIABLES else value
    return out


def for_workers(spec: StudySpec) -> StudySpec:
    """The spec the trials get: data paths absolute, as the driver resolves them.

    A relative `data.root` or csv `data.path` means the driver's working directory; a worker
    on another node starts in its copy of the study folder. MNIST-style files the driver found
    in a folder it was pointed at (`data.root`, `$DLSEARCH_DATA_DIR`) are that folder for every
    trial, never downloaded again: a node that does not see it is left out by `check_nodes`.
    """
    from dlsearch.trial.data import find_idx_files, search_roots  # torch: only where a run is dispatched

    update: dict[str, Any] = {field: os.path.abspath(os.path.expanduser(value))
                              for field in ("root", "path") if isinstance(value := getattr(spec.data, field), str)}
    found = find_idx_files(spec.data)
    if found is not None and found != search_roots(spec.data)[-1]:  # the last is the user's own cache
        update.update(root=str(found), download=False)
    return spec.model_copy(update={"data": spec.data.model_copy(update=update)}) if update else spec


def cluster_runtime_env(spec: StudySpec) -> dict[str, Any] | None:
    """What a Ray cluster's workers need of the study's own code, or None when it names none.

    The study file's folder goes as `working_dir` (Ray copies it to every node and starts the
    workers in it); a module of an entry point found elsewhere outside the installed packages
    (e.g. a package in the working directory) goes as `py_modules`. Local runs need neither:
    their workers see the driver's folders.
    """
    refs = [ref for ref, used in ((spec.data.factory, spec.data.dataset == "custom"),
                                  (spec.model.factory, spec.model.kind == "custom"), (spec.trainable, True))
            if ref and used]
    if not refs or spec.path is None:
        return None
    study_dir = spec.path.parent
    env: dict[str, Any] = {"working_dir": str(study_dir), "excludes": ["mlruns/", "__pycache__/", "*.db"]}
    others = [str(p) for p in local_code(refs, study_dir) if not p.is_relative_to(study_dir)]
    if others:
        env["py_modules"] = others
    return env


def runtime_env(spec: StudySpec, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime environment of a cluster run: the study's code and the forwarded variables."""
    env = dict(cluster_runtime_env(spec) or {})
    # Trials keep the folder their worker starts in (the study folder's copy), as in a local run.
    env["env_vars"] = {"RAY_CHDIR_TO_TRIAL_DIR": "0", **worker_env(environ)}
    return env


@dataclass(frozen=True)
class NodeCheck:
    """One node's answer to the preflight: no problems, or what does not resolve there."""

    node_id: str
    node_ip: str
    hostname: str
    problems: tuple[str, ...]

    def line(self) -> str:
        return f"resources.address: node {self.node_ip} ({self.hostname}) cannot run trials: {'; '.join(self.problems)}"


def node_problems(spec: StudySpec, code_paths: Sequence[str] = ()) -> list[str]:
    """What would stop a trial of `spec` on this machine: missing data, entry points that do not
    import. Runs in a Ray task on each node; never downloads or writes."""
    from dlsearch.trial.data import check_data_available
    from dlsearch.config.entrypoints import add_search_paths, problem

    add_search_paths(code_paths)
    out = list(check_data_available(spec.data))
    base_dir = spec.path.parent if spec.path else None
    refs = [("data.factory", spec.data.factory, spec.data.dataset == "custom"),
            ("model.factory", spec.model.factory, spec.model.kind == "custom"),
            ("trainable", spec.trainable, True)]
    for key, ref, used in refs:
        if ref and used and (line := problem(ref, key, base_dir)) is not None:
            out.append(line)
    return out


def _check_here(spec: StudySpec, code_paths: Sequence[str]) -> tuple[str, str, list[str]]:
    import socket

    import ray

    try:
        problems = node_problems(spec, code_paths)
    except Exception as err:  # noqa: BLE001 - whatever stops the check on this node is its answer
        problems = [f"{type(err).__name__}: {err}"]
    return ray.get_runtime_context().get_node_id(), socket.gethostname(), problems


def trial_nodes(cpus: float, gpus: float) -> list[dict[str, Any]]:
    """The live nodes with room for one trial (`cpus` CPUs and `gpus` GPUs)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus
            and n["Resources"].get("GPU", 0) >= gpus]


def usable_resources(avoid: Sequence[str]) -> dict[str, float]:
    """The resources of the live nodes not in `avoid`: what the study's trials can use."""
    import ray

    if not avoid:
        return dict(ray.cluster_resources())
    total: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive") and node["NodeID"] not in avoid:
            for name, amount in node["Resources"].items():
                total[name] = total.get(name, 0) + amount
    return total


def check_nodes(spec: StudySpec, code_paths: Sequence[str], cpus: float, gpus: float) -> list[NodeCheck]:
    """Run `node_problems` once on every node that can hold a trial; every node's answer.

    Raises SpecError (exit 2) naming every node when none can run a trial.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = trial_nodes(cpus, gpus)
    task = ray.remote(num_cpus=0, max_retries=0)(_check_here)
    pending = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(spec, list(code_paths)): n for n in nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=NODE_CHECK_TIMEOUT_S)
    checks = []
    for ref in ready:
        node = pending[ref]
        try:
            node_id, hostname, problems = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a node whose worker cannot start (runtime env, ...)
            node_id, hostname, problems = node["NodeID"], node.get("NodeManagerHostname", "?"), [
                str(err).strip().splitlines()[-1][:300]]
        checks.append(NodeCheck(node_id, node["NodeManagerAddress"], hostname, tuple(problems)))
    for ref in late:
        node = pending[ref]
        ray.cancel(ref, force=True)
        checks.append(NodeCheck(node["NodeID"], node["NodeManagerAddress"], node.get("NodeManagerHostname", "?"),
                                (f"did not answer within {NODE_CHECK_TIMEOUT_S} s",)))
    if checks and all(c.problems for c in checks):
        raise SpecError([c.line() for c in checks])
    return checks


def excluding(node_ids: Sequence[str]) -> dict[str, Any]:
    """Placement-group options keeping a trial's bundle off `node_ids` ({} for none)."""
    if not node_ids:
        return {}
    return {"bundle_label_selector": [{NODE_ID_LABEL: f"!in({','.join(node_ids)})"}]}

