"""Cluster runs: a two-node Ray cluster on loopback with token authentication, an MLflow server on
PostgreSQL (plain and with basic auth), and the deploy/ manifests and scripts.

Every server here is started by the test, listens on loopback, and is stopped by its process
group (never `ray stop`, which would stop every Ray on the machine, other tests' included).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mlflow import MlflowClient

from tests.studies import write_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEPLOY = ROOT / "deploy"
VERSION = "0.1.0"
# Two Ray nodes on one host need two addresses: `ray start` turns 127.0.0.1 into the host's
# outward address, but keeps the rest of the loopback range (Linux answers all of 127/8).
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
EXTRA_IP = "127.0.0.4"  # a third node, added by the test that sets it apart
LOST_IP = "127.0.0.5"  # a third node, added by the test that loses it (not EXTRA_IP: a stopped node's address)


# ---------------------------------------------------------------- deploy/


def _deploy_yaml() -> dict[str, list[dict]]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    return {str(p.relative_to(DEPLOY)): [d for d in yaml.safe_load_all(p.read_text()) if d] for p in files}


def _containers(doc: Any) -> Iterator[dict]:
    """Every container spec anywhere in a manifest."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _containers(item)


def test_every_deploy_yaml_loads_and_names_the_right_image_and_command() -> None:
    docs = _deploy_yaml()
    assert {"kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/storage.yaml", "ray-up/cluster.yaml",
            "mlflow/docker-compose.yaml", "mlflow/kubernetes.yaml"} <= set(docs)
    for name, manifests in docs.items():
        assert manifests, f"{name} is empty"
        images = {c["image"] for c in _containers(manifests)}
        if name.startswith("kuberay/") and name != "kuberay/storage.yaml":
            assert images == {f"dlsearch:{VERSION}"}, (name, images)  # head, workers: one image
        if name == "mlflow/kubernetes.yaml":
            assert images == {"postgres:16", "dlsearch-mlflow:3.17.2"}, images
    # The RayJob: `dlsearch run` on the head, joined to the job's cluster, with token auth.
    [job] = docs["kuberay/rayjob.yaml"]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["dlsearch", "run", "/studies/study.yaml"] and entrypoint[3:5] == ["--address", "auto"]
    assert "tracking.uri=http://mlflow.mlflow.svc:5000" in entrypoint
    assert "resources.storage_path=/shared/ray" in entrypoint
    for kind, cluster in (("RayJob", job["spec"]["rayClusterSpec"]), ("RayCluster", docs["kuberay/raycluster.yaml"][0]["spec"])):
        assert cluster["authOptions"] == {"mode": "token", "secretName": "dlsearch-ray-token"}, kind
        assert cluster["rayVersion"] == _ray_version()
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # trials run on the workers
        volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
        assert volumes["study"]["configMap"]["name"] == "dlsearch-study"
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "dlsearch-shared"
        for container in _containers(cluster):
            env = {e["name"]: e for e in container["env"]}
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "dlsearch-credentials"  # never a value
    [launcher] = docs["ray-up/cluster.yaml"]
    assert launcher["docker"]["image"] == f"dlsearch:{VERSION}" and launcher["provider"]["type"] == "local"
    assert "ray start --head" in " ".join(launcher["head_start_ray_commands"])
    assert "ray start --address" in " ".join(launcher["worker_start_ray_commands"])
    # The MLflow server: PostgreSQL backend, proxied artifacts, basic auth; its password from the environment.
    [compose] = docs["mlflow/docker-compose.yaml"]
    server = compose["services"]["mlflow"]
    assert server["image"] == "dlsearch-mlflow:3.17.2" and server["command"][:2] == ["mlflow", "server"]
    assert {"--app-name=basic-auth", "--backend-store-uri=postgresql://mlflow@postgres:5432/mlflow",
            "--artifacts-destination=/mlartifacts"} <= set(server["command"])
    assert compose["services"]["postgres"]["image"] == "postgres:16"
    [deployment] = [d for d in docs["mlflow/kubernetes.yaml"] if d["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in command
    assert "--backend-store-uri=postgresql://mlflow@mlflow-postgres:5432/mlflow" in command


def test_dockerfiles_install_dlsearch_on_cpu_and_cuda_bases() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{_ray_version()}-py311-cpu" in text
    assert 'pip install --no-cache-dir ".[postgres]"' in text
    readme = (DEPLOY / "docker" / "README.md").read_text()
    assert f"BASE_IMAGE=rayproject/ray:{_ray_version()}-py311-gpu" in readme and f"dlsearch:{VERSION}" in readme
    assert '"mlflow[auth]==3.17.2"' in (DEPLOY / "mlflow" / "Dockerfile").read_text()


def test_shell_scripts_pass_bash_n() -> None:
    scripts = sorted(DEPLOY.rglob("*.sh")) + sorted(DEPLOY.rglob("*.sbatch"))
    assert {p.name for p in scripts} >= {"dlsearch.sbatch", "init-databases.sh"}
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    sbatch = (DEPLOY / "slurm" / "dlsearch.sbatch").read_text()
    assert "ray start --head" in sbatch and "ray start --address" in sbatch
    assert 'dlsearch run "$study" --address "$head_ip:$port"' in sbatch


def _ray_version() -> str:
    """The Ray of the image (its base's tag): the manifests' rayVersion must say the same."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    return text.split("ARG RAY_VERSION=", 1)[1].split()[0]


# ---------------------------------------------------------------- what travels to the workers


def test_workers_get_the_dlsearch_variables_absolute_and_never_a_credential(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dlsearch.backend.cluster import for_workers, runtime_env, worker_env
    from dlsearch.config.spec import load_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DLSEARCH_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    environ = {"DLSEARCH_DATA_DIR": "../data", "DLSEARCH_NOTE": "x", "DLSEARCH_EMPTY": "",
               "MLFLOW_TRACKING_PASSWORD": "p", "MLFLOW_TRACKING_TOKEN": "t", "PGPASSWORD": "q",
               "RAY_AUTH_TOKEN": "r", "HOME": "/root"}
    assert worker_env(environ) == {"DLSEARCH_DATA_DIR": str(tmp_path.parent / "data"), "DLSEARCH_NOTE": "x"}
    spec = load_spec(write_study(tmp_path, data={"dataset": "mnist", "root": "mnist-files"}))
    env = runtime_env(spec, environ)
    assert env == {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", **worker_env(environ)}}  # no user code to ship
    sent = for_workers(spec)
    assert sent.data.root == str(tmp_path / "mnist-files") and spec.data.root == "mnist-files"
    assert sent.path == spec.path and sent.search == spec.search  # nothing else changes
    if (SHARED_DATA / "mnist").is_dir():  # files the driver found where it was pointed: that folder, no download
        monkeypatch.setenv("DLSEARCH_DATA_DIR", str(SHARED_DATA))
        sent = for_workers(spec)
        assert (sent.data.root, sent.data.download) == (str(SHARED_DATA / "mnist"), False)


def test_a_resumed_study_goes_on_counting_the_failures_in_a_row() -> None:
    import optuna

    from dlsearch.tuner.runner import _failure_streak

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    assert _failure_streak(study) == ("", 0)
    for reason in ("bad", "interrupted", "worse", "worse"):  # an interrupted trial does not count
        trial = study.ask()
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert _failure_streak(study) == ("worse", 2)
    study.tell(study.ask(), 1.0)
    assert _failure_streak(study) == ("", 0)


# ---------------------------------------------------------------- two Ray nodes


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A head and a worker node, 1 CPU each, with token authentication; stopped on teardown."""
    if not sys.platform.startswith("linux"):
        pytest.skip("two Ray nodes on one host need Linux's loopback range (127.0.0.2, 127.0.0.3)")
    port = _free_port()
    token = secrets.token_hex(16)
    # A short temp dir of its own (Unix socket paths must stay under 108 characters), for both
    # nodes: `ray start` leaves the cluster's address in <temp dir>/ray_current_cluster, and in
    # /tmp/ray every later plain ray.init() on this machine would join (or hang on) this cluster.
    temp = tempfile.mkdtemp(prefix="dlray-", dir="/tmp")
    # The nodes' own environment, as on machines of their own: none of the driver's DLSEARCH_* settings
    # (what a trial needs of them must travel with the run), and a lost node noticed within seconds.
    env = {**_without_ray_auth(os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": temp,
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env = {k: v for k, v in env.items() if not k.startswith("DLSEARCH_") and k != "PYTHONPATH"}
    started: list[subprocess.Popen] = []
    try:
        head = _start([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--node-ip-address={HEAD_IP}",
                       f"--port={port}", "--include-dashboard=false", *_node_options(temp)],
                      env, Path(temp) / "head.log", cwd=temp)
        started.append(head)
        _wait_for(lambda: _connects(HEAD_IP, port), 90, "the Ray head", head)
        cluster = {"address": f"{HEAD_IP}:{port}", "token": token, "temp": temp, "env": env}
        started.append(_add_node(cluster, WORKER_IP))
        yield cluster
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _node_options(temp: str) -> list[str]:
    return ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp}"]


def _add_node(cluster: dict[str, Any], ip: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A node joining the cluster on `ip`, in a process group of its own (stop it with `_stop`)."""
    log = Path(cluster["temp"]) / f"node-{ip}.log"
    node = _start([sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={cluster['address']}",
                   f"--node-ip-address={ip}", *_node_options(cluster["temp"])], {**cluster["env"], **(env or {})},
                  log, cwd=cluster["temp"])
    _wait_for(lambda: "Ray runtime started" in log.read_text(), 90, f"the Ray node on {ip}", node)
    return node


def test_a_cluster_with_token_auth_refuses_a_run_without_the_token(ray_cluster: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    path = write_study(tmp_path, name="no-token")
    out = _dlsearch(["run", str(path), "--address", ray_cluster["address"]], _without_ray_auth(os.environ), tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "resources.address" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()  # no trace
    wrong = {**_without_ray_auth(os.environ), "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    out = _dlsearch(["run", str(path), "--address", ray_cluster["address"]], wrong, tmp_path)
    assert out.returncode == 1 and "refused the token" in out.stderr, out.stderr
    assert wrong["RAY_AUTH_TOKEN"] not in out.stdout + out.stderr


def _token_env(cluster: dict[str, Any], **extra: str) -> dict[str, str]:
    """The driver's environment: the cluster's token, no DLSEARCH_* of the test run's own, and `extra`."""
    env = {k: v for k, v in _without_ray_auth(os.environ).items() if not k.startswith("DLSEARCH_")}
    return {**env, "RAY_AUTH_TOKEN": cluster["token"], **extra}


def _children(folder: Path, name: str) -> list[Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]


def _trials(folder: Path, name: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db").get_trials()


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="MNIST is read from ../shared/data")
def test_mnist_found_through_dlsearch_data_dir_trains_on_every_node(ray_cluster: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    # No data.root: the files are where DLSEARCH_DATA_DIR points, given relative to the driver's
    # working directory; the nodes were started without it (see `ray_cluster`).
    path = write_study(tmp_path, name="mnist-env", data={"dataset": "mnist", "subset": 1200, "val_fraction": 0.2},
                       budget={"trials": 4}, train={"epochs": 2}, pruner={"type": "none"},
                       resources={"max_concurrent": 2, "storage_path": str(tmp_path / "shared")},
                       tracking={"register_best": False})
    # Only the token: dlsearch turns on Ray's token mode for an explicit address itself.
    env = _token_env(ray_cluster, DLSEARCH_DATA_DIR=os.path.relpath(SHARED_DATA, tmp_path))
    out = _dlsearch(["run", str(path), "--address", ray_cluster["address"]], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ray_cluster["token"] not in out.stdout + out.stderr
    assert "cluster: 2 nodes run trials; they get DLSEARCH_DATA_DIR from this environment" in out.stdout
    children = _children(tmp_path, "mnist-env")
    assert len(children) == 4
    assert {r.data.tags["dlsearch.state"] for r in children} == {"COMPLETE"}, [
        r.data.tags.get("dlsearch.fail_reason") for r in children]
    by_node = {r.data.tags["dlsearch.node"]: r.data.tags["dlsearch.node_ip"] for r in children}
    assert sorted(by_node.values()) == [HEAD_IP, WORKER_IP]  # Ray node ids: both nodes ran trials
    assert all(r.data.tags.get("dlsearch.hostname") for r in children)
    assert list((tmp_path / "shared").glob("mnist-env-*")), "Tune's experiment folder belongs under storage_path"


_SEES_ENV = """\
import os


def fit(config, report):
    seen = sorted(k for k in os.environ if k.startswith(("DLSEARCH_", "MLFLOW_TRACKING_", "PGPASSWORD")))
    absolute = os.path.isabs(os.environ.get("DLSEARCH_DATA_DIR", ""))
    raise RuntimeError(f"broken on purpose; the worker sees {','.join(seen)}; data dir absolute: {absolute}")
"""

_FIXED = """\
def fit(config, report):
    for epoch in range(1, 3):
        report(epoch, {"loss": config["model"]["x"] / epoch})
"""


def test_identical_failures_stop_the_study_and_a_rerun_after_the_fix_continues(ray_cluster: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "fit.py").write_text(_SEES_ENV)  # shipped with the study folder (working_dir)
    path = write_study(study_dir, name="repeats", data={"dataset": "digits"}, model={"kind": "custom", "x": 0.0},
                       trainable="fit:fit", search={"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
                       objective={"metric": "loss", "direction": "minimize"}, pruner={"type": "none"},
                       budget={"trials": 4},
                       resources={"max_concurrent": 2, "stop_after_identical_failures": 2,
                                  "storage_path": str(tmp_path / "shared")},
                       tracking={"register_best": False})
    secrets_ = {"MLFLOW_TRACKING_USERNAME": "someone", "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(8),
                "PGPASSWORD": secrets.token_hex(8)}
    env = _token_env(ray_cluster, DLSEARCH_DATA_DIR="data", DLSEARCH_NOTE="hello", **secrets_)
    out = _dlsearch(["run", str(path), "--address", ray_cluster["address"]], env, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    reason = ("RuntimeError: broken on purpose; the worker sees DLSEARCH_DATA_DIR,DLSEARCH_NOTE; "
              "data dir absolute: True")  # the DLSEARCH_* variables travel, absolute; no credential does
    assert out.stderr.count(reason) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"stopped: 2 trials in a row failed with the same reason: {reason}"), out.stderr
    failed = [t for t in _trials(study_dir, "repeats") if t.user_attrs.get("fail_reason") == reason]
    assert 2 <= len(failed) <= 3 and all(t.state.name == "FAIL" for t in failed)  # not the whole budget of 4
    (study_dir / "fit.py").write_text(_FIXED)
    out = _dlsearch(["run", str(path), "--address", ray_cluster["address"]], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = _trials(study_dir, "repeats")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "FAIL") and t.user_attrs.get("fail_reason") !=
                "interrupted"]
    assert len(finished) == 4, [(t.number, t.state, t.user_attrs) for t in trials]
    assert [t.number for t in finished if t.state.name == "FAIL"] == [t.number for t in failed]  # kept, as they were
    assert all(t.user_attrs.get("fail_reason") == reason for t in finished if t.state.name == "FAIL")
    states = {r.data.tags["dlsearch.trial_number"]: r.data.tags["dlsearch.state"] for r in _children(study_dir,
                                                                                                       "repeats")}
    assert sum(s == "COMPLETE" for s in states.values()) == 4 - len(failed)


_ONLY_HERE = "def value():\n    return 1.0\n"

_IMPORTS_ONLY_HERE = """\
import onlyhere


def fit(config, report):
    import time

    import ray

    for epoch in range(1, 4):
        time.sleep(0.2)
        report(epoch, {"loss": onlyhere.value() / epoch, "ip": float(ray.util.get_node_ip_address().split(".")[-1])})
"""


def test_the_cluster_preflight_names_the_nodes_that_cannot_run_trials_and_leaves_them_out(
        ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    # `onlyhere` is on the driver's PYTHONPATH and, later, on one node's: not in the study folder.
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "onlyhere.py").write_text(_ONLY_HERE)
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "fit.py").write_text(_IMPORTS_ONLY_HERE)
    path = write_study(study_dir, name="preflight", data={"dataset": "digits"}, model={"kind": "custom", "x": 0.0},
                       trainable="fit:fit", search={"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
                       objective={"metric": "loss", "direction": "minimize"}, pruner={"type": "none"},
                       budget={"trials": 2}, resources={"storage_path": str(tmp_path / "shared")},
                       tracking={"register_best": False})
    env = {**_token_env(ray_cluster), "PYTHONPATH": f"{ROOT}:{tmp_path / 'lib'}"}
    run = [sys.executable, "-m", "dlsearch", "run", str(path), "--address", ray_cluster["address"]]
    out = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.stderr, out.stderr  # one line per node
    for ip, line in zip(sorted([HEAD_IP, WORKER_IP]), sorted(lines)):
        assert line.startswith(f"resources.address: node {ip} (") and "cannot import 'fit'" in line, line
        assert "No module named 'onlyhere'" in line, line
    assert not (study_dir / "mlflow.db").exists() and not (study_dir / "optuna.db").exists()  # nothing written
    # A node that has the module: the other two are named and left out, and every trial runs there.
    extra = _add_node(ray_cluster, EXTRA_IP, {"PYTHONPATH": str(tmp_path / "lib")})
    try:
        out = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    finally:
        _stop(extra)
    assert out.returncode == 0, out.stdout + out.stderr
    left_out = [line for line in out.stdout.splitlines() if line.endswith("; left out of this study")]
    assert sorted(line.split()[2] for line in left_out) == [HEAD_IP, WORKER_IP], out.stdout
    assert "cluster: 1 node runs trials; it gets no DLSEARCH_* variable" in out.stdout
    children = _children(study_dir, "preflight")
    assert len(children) == 2 and {r.data.tags["dlsearch.state"] for r in children} == {"COMPLETE"}
    assert {r.data.tags["dlsearch.node_ip"] for r in children} == {EXTRA_IP}


_SLOW_EPOCHS = """\
import os
import time
from pathlib import Path

import ray


def fit(config, report):
    # Where each trial started, for the test to know when the node it will lose is busy.
    Path(os.environ["DLSEARCH_TEST_MARKERS"], f"{ray.util.get_node_ip_address()}-{time.time_ns()}").touch()
    for epoch in range(1, 9):
        time.sleep(0.5)
        report(epoch, {"loss": config["model"]["x"] / epoch})
"""


def test_a_node_lost_mid_study_leaves_the_study_complete_on_the_others(ray_cluster: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "fit.py").write_text(_SLOW_EPOCHS)
    markers = tmp_path / "markers"
    markers.mkdir()
    path = write_study(study_dir, name="lost-node", data={"dataset": "digits"}, model={"kind": "custom", "x": 0.0},
                       trainable="fit:fit", search={"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
                       objective={"metric": "loss", "direction": "minimize"}, pruner={"type": "none"},
                       budget={"trials": 4},
                       # One trial per node at once (write_study runs one at a time): the node to lose
                       # surely gets one of the first three.
                       resources={"max_concurrent": 3, "storage_path": str(tmp_path / "shared")},
                       tracking={"register_best": False})
    extra = _add_node(ray_cluster, LOST_IP)
    env = _token_env(ray_cluster, DLSEARCH_TEST_MARKERS=str(markers))
    cmd = [sys.executable, "-m", "dlsearch", "run", str(path), "--address", ray_cluster["address"]]
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: any(m.name.startswith(f"{LOST_IP}-") for m in markers.iterdir()), 180,
                      "a trial on the node to lose", driver)
            time.sleep(1)  # an epoch or two in
            _stop(extra, grace_s=0)  # SIGKILL to every process of the node
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
    text = (tmp_path / "run.log").read_text()
    assert driver.returncode == 0, text
    trials = [t for t in _trials(study_dir, "lost-node") if t.state.is_finished()]
    assert sorted(t.number for t in trials) == list(range(4)) and {t.state.name for t in trials} == {"COMPLETE"}
    children = _children(study_dir, "lost-node")
    assert sorted(int(r.data.tags["dlsearch.trial_number"]) for r in children) == list(range(4))  # none twice
    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir}/mlflow.db")
    for run in children:  # a trial the lost node ran again elsewhere logs each epoch once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 8, (run.data.tags["dlsearch.trial_number"], steps)
    started_at = [m.name.split("-")[0] for m in markers.iterdir()]
    assert LOST_IP in started_at and len(started_at) > 4, started_at  # the lost node's trial started again


# ---------------------------------------------------------------- MLflow server on PostgreSQL


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, Any]]:
    """A throwaway PostgreSQL cluster on loopback (trust auth), with databases for MLflow and Optuna."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries are not installed (.ci/run installs Debian's `postgresql`)")
    as_owner = _postgres_runner()
    folder = tempfile.mkdtemp(prefix="dlpg-", dir="/tmp")  # short: the Unix socket lives here
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = Path(folder) / "data"
    port = _free_port()
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
    subprocess.run(as_owner(initdb), check=True, capture_output=True)
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(Path(folder) / "log"), "-o", options]
    subprocess.run(as_owner([*pg_ctl, "-w", "start"]), check=True, capture_output=True)
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}"
        for database in ("mlflow", "mlflow_auth", "optuna"):
            subprocess.run([str(bin_dir / "psql"), f"{url}/postgres", "-qc", f"CREATE DATABASE {database}"],
                           check=True, capture_output=True)
        yield {"url": url}
    finally:
        subprocess.run(as_owner([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mlflow server` with basic auth: runs and users in PostgreSQL, artifacts proxied to a folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    config = folder / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {postgres['url']}/mlflow_auth\n"
                      "admin_username = admin\nauth_cache_ttl_seconds = 60\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    password = secrets.token_hex(12)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with _mlflow_server(postgres, folder, ("--app-name", "basic-auth"), env) as url:
        yield {"url": url, "user": "admin", "password": password, "artifacts": folder / "artifacts",
               "auth": {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}}


def test_a_study_logs_to_an_mlflow_server_on_postgresql(mlflow_server: dict[str, Any], postgres: dict[str, Any],
                                                         tmp_path: Path) -> None:
    url, auth, password = mlflow_server["url"], mlflow_server["auth"], mlflow_server["password"]
    path = write_study(tmp_path, name="server-study", budget={"trials": 4}, train={"epochs": 4},
                       resources={"max_concurrent": 2},
                       tracking={"uri": url, "optuna_storage": f"{postgres['url']}/optuna"})
    # The credentials come from the environment, where MLflow's client reads them.
    env = {**_without_credentials(os.environ), "MLFLOW_TRACKING_USERNAME": mlflow_server["user"],
           "MLFLOW_TRACKING_PASSWORD": password}
    out = _dlsearch(["run", str(path)], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert password not in out.stdout + out.stderr
    assert "View run" not in out.stdout  # MLflow's own per-run line would break the progress display
    experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", auth, experiment_name="server-study")
    experiment_id = experiment["experiment"]["experiment_id"]
    # The server chose the artifact location: the runs' files go through it, not to the driver's disk.
    assert experiment["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
    runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 100},
                 auth)["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    [parent] = [rid for rid, t in tags.items() if t.get("dlsearch.role") == "parent"]
    children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent]
    assert len(children) == 4 and len(runs) == 5
    assert all(tags[c]["dlsearch.state"] in ("COMPLETE", "PRUNED") and tags[c]["dlsearch.node"] for c in children)
    for run in runs:  # nothing of the credentials is logged
        values = [p["value"] for p in run["data"].get("params", [])] + list(tags[run["info"]["run_id"]].values())
        assert not any(password in v for v in values)
    for child in children:
        files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list", auth, run_id=child).get("files", [])}
        assert "config.yaml" in files
    parent_files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list", auth, run_id=parent)["files"]}
    assert {"study.yaml", "resolved_spec.yaml", "leaderboard.csv", "learning_curves.png"} <= parent_files
    assert list(mlflow_server["artifacts"].rglob("config.yaml"))  # stored by the server, in its artifact store
    alias = _get(url, "/api/2.0/mlflow/registered-models/alias", auth, name="server-study", alias="best")
    assert alias["model_version"]["run_id"] in children
    # The UI the team opens: its page, and the runs it nests under the parent.
    request = urllib.request.Request(url + "/", headers=auth)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and b"<html" in response.read().lower()
    ui_runs = _post(url, "/ajax-api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]}, auth)["runs"]
    assert len(ui_runs) == 5
    with pytest.raises(urllib.error.HTTPError) as refused:  # and the server does keep its door shut
        _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
    assert refused.value.code == 401


def test_wrong_or_missing_credentials_stop_the_run_before_it_writes(mlflow_server: dict[str, Any], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dlsearch.cli.commands import main

    url, user, password = mlflow_server["url"], mlflow_server["user"], mlflow_server["password"]
    for name in [k for k in os.environ if k.startswith("MLFLOW_TRACKING_")]:
        monkeypatch.delenv(name)
    path = write_study(tmp_path, name="auth-study", tracking={"uri": url})
    # A password written into the URI would be logged with the study: refused as bad input.
    leaky = write_study(tmp_path, "leaky.yaml", tracking={"uri": url.replace("://", f"://{user}:{password}@")})
    out = CliRunner().invoke(main, ["run", str(leaky)])
    assert out.exit_code == 2 and out.stderr.startswith("tracking.uri: a password in the URI"), out.output
    assert password not in out.output
    out = CliRunner().invoke(main, ["run", str(path)])
    assert out.exit_code == 1 and out.stderr.startswith("tracking.uri: ") and "needs credentials" in out.stderr, (
        out.output)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + password)
    out = CliRunner().invoke(main, ["run", str(path)])
    assert out.exit_code == 1, out.output
    assert out.stderr.startswith("tracking.uri: ") and "refused the credentials" in out.stderr
    assert "not-" + password not in out.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "artifacts").exists()  # nothing written


# ---------------------------------------------------------------- helpers


def _dlsearch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlsearch", *args], env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def _without_credentials(env: Any) -> dict[str, str]:
    return {k: v for k, v in _without_ray_auth(env).items() if not k.startswith("MLFLOW_TRACKING_")}


def _without_ray_auth(env: Any) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: str | None = None) -> subprocess.Popen:
    """A server in a process group of its own, so that teardown stops it and everything it started."""
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)


def _stop(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM to the process group, and SIGKILL to whatever is left after `grace_s`."""
    if grace_s > 0:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also the group's members that outlived the leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_for(ready: Any, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"{what} did not come up in {timeout_s} s")


class _mlflow_server:
    """`mlflow server` on the PostgreSQL backend, artifacts proxied to a local folder; a context manager."""

    def __init__(self, postgres: dict[str, Any], folder: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.port = _free_port()
        self.folder = folder
        self.cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres['url']}/mlflow",
                    "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", "1", *extra]
        # The job runner (a pool of worker processes for GenAI jobs) is not needed here.
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}

    def __enter__(self) -> str:
        self.proc = _start(self.cmd, self.env, self.folder / "server.log")
        url = f"http://127.0.0.1:{self.port}"
        try:
            _wait_for(lambda: _health(url), 120, f"{shlex.join(self.cmd)} (see {self.folder}/server.log)", self.proc)
        except BaseException:
            _stop(self.proc, grace_s=0)
            raise
        return url

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc, grace_s=0)  # a throwaway server: its data is in PostgreSQL and a temp folder


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except OSError:
        return False


def _get(url: str, endpoint: str, headers: dict[str, str] | None = None, **query: str) -> dict:
    request = urllib.request.Request(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, endpoint: str, body: dict, headers: dict[str, str] | None = None) -> dict:
    request = urllib.request.Request(url + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _postgres_bin() -> Path | None:
    """Debian keeps the server binaries under /usr/lib/postgresql/<major>/bin, off the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


def _postgres_runner() -> Any:
    """PostgreSQL refuses to run as root: as root, run its commands as the package's `postgres` user."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    if shutil.which("runuser"):
        return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]
    return lambda cmd: ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
