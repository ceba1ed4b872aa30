"""GPU scheduling, shown without a GPU: a local Ray that declares GPUs it does not have.

Ray hands out GPU ids and shares by its own bookkeeping, so which trials share which device,
the share each gets and whether a device is ever over-committed are all real here. CUDA itself is
not: no test calls it. The memory cap a trial on a share sets is the value it reports (the tag
`dlsearch.gpu_memory_fraction`), which the worker passes to
`torch.cuda.set_per_process_memory_fraction` only where CUDA is there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
from mlflow import MlflowClient

from dlsearch.config.spec import load_spec
from dlsearch.tuner.runner import run_study
from tests.studies import write_study

N_GPUS = 2

FIT = """\
import json
import time
from pathlib import Path

import ray


def fit(config, report):
    model = config["model"]
    ids = [str(i) for i in ray.get_gpu_ids()]
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    if model.get("oom") and share < 0.5:
        raise MemoryError("CUDA out of memory (pretend): this trial needs half a GPU")
    markers = Path(model["markers"])
    (markers / f"started-{config['number']}-{time.time_ns()}").touch()
    # A barrier: the trials that may run at once wait for each other, so that they surely overlap.
    deadline = time.time() + 120
    while len(list(markers.glob("started-*"))) < model["barrier"] and time.time() < deadline:
        time.sleep(0.05)
    started = time.time()
    for epoch in range(1, 3):
        time.sleep(0.2)
        report(epoch, {"loss": config["x"] / epoch})
    record = {"number": config["number"], "gpus": ids, "share": share, "start": started, "end": time.time()}
    (markers / f"{config['number']}.json").write_text(json.dumps(record))
"""


@pytest.fixture(scope="module")
def fake_gpus() -> Iterator[None]:
    """A local Ray with N_GPUS GPUs it does not have (and CPUs enough for every trial to run at once)."""
    ray.init(address="local", num_cpus=8, num_gpus=N_GPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _study(folder: Path, name: str, resources: dict[str, Any], trials: int = 4, barrier: int = 1,
           **changes: Any) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_fit.py").write_text(FIT)
    (folder / "markers").mkdir()
    model = {"kind": "custom", "markers": str(folder / "markers"), "barrier": barrier, **changes.pop("model", {})}
    path = write_study(folder, name=name, trainable="gpu_fit:fit", model=model, data={"dataset": "custom"},
                       search={"x": {"type": "float", "low": 0.0, "high": 1.0}},
                       objective={"metric": "loss", "direction": "minimize"}, pruner={"type": "none"},
                       budget={"trials": trials}, resources=resources,
                       tracking={"register_best": False}, **changes)
    return load_spec(path)


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (folder / "markers").glob("*.json")]


def _runs(folder: Path, name: str) -> list[Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]


def _max_load(records: list[dict[str, Any]]) -> dict[str, float]:
    """The most of each GPU that trials running at the same moment held."""
    load: dict[str, float] = {}
    for moment in sorted(r["start"] for r in records):
        for gpu in {g for r in records for g in r["gpus"]}:
            held = sum(r["share"] / len(r["gpus"]) for r in records
                       if gpu in r["gpus"] and r["start"] <= moment < r["end"])
            load[gpu] = max(load.get(gpu, 0.0), held)
    return load


@pytest.mark.parametrize(("gpus_per_trial", "max_concurrent", "share", "per_gpu"), [
    (1, "auto", 1.0, 1),
    (0.5, "auto", 0.5, 2),
    (0.25, "auto", 0.25, 4),
    ("auto", 4, 0.5, 2),  # auto: the GPUs shared among the trials that run at once
], ids=["1-per-gpu", "2-per-gpu", "4-per-gpu", "auto"])
def test_trials_share_the_gpus_as_asked_and_no_gpu_is_over_committed(fake_gpus: None, tmp_path: Path,
                                                                     gpus_per_trial: Any, max_concurrent: Any,
                                                                     share: float, per_gpu: int) -> None:
    n_trials = N_GPUS * per_gpu  # as many as the GPUs can hold at once: they all run together
    spec = _study(tmp_path, "shares", {"gpus_per_trial": gpus_per_trial, "max_concurrent": max_concurrent,
                                       "cpus_per_trial": 1}, trials=n_trials, barrier=n_trials)
    summary = run_study(spec)
    assert summary.n_complete == n_trials
    records = _records(tmp_path)
    assert len(records) == n_trials
    assert all(r["share"] == share and len(r["gpus"]) == 1 for r in records), records
    load = _max_load(records)
    assert set(load) == {str(i) for i in range(N_GPUS)}  # every GPU was used
    assert all(v <= 1.0 + 1e-9 for v in load.values()), load  # none over-committed
    assert max(load.values()) == pytest.approx(per_gpu * share)  # and shared as asked, at once
    for run in _runs(tmp_path, "shares"):
        tags = run.data.tags
        assert float(tags["dlsearch.gpu_share"]) == share and tags["dlsearch.gpus"] in {"0", "1"}
        # A share below one GPU caps the trial's memory at that share (CUDA applies it; here it is reported).
        assert tags.get("dlsearch.gpu_memory_fraction") == (f"{share:g}" if share < 1 else None)


def test_an_out_of_memory_trial_runs_again_with_twice_the_share(fake_gpus: None, tmp_path: Path) -> None:
    spec = _study(tmp_path, "oom", {"gpus_per_trial": 0.25, "cpus_per_trial": 1, "max_concurrent": 2},
                  trials=2, model={"oom": True})
    summary = run_study(spec)
    assert summary.n_complete == 2 and summary.n_failed == 0
    runs = _runs(tmp_path, "oom")
    failed = [r for r in runs if r.data.tags["dlsearch.state"] == "FAIL"]
    complete = [r for r in runs if r.data.tags["dlsearch.state"] == "COMPLETE"]
    assert len(failed) == 2 and len(complete) == 2  # each first try ran out of memory, each rerun completed
    assert {r.data.tags["dlsearch.gpu_share"] for r in failed} == {"0.25"}
    assert {r.data.tags["dlsearch.gpu_share"] for r in complete} == {"0.5"}
    assert {r.data.tags["dlsearch.gpu_memory_fraction"] for r in complete} == {"0.5"}
    assert all("runs again with 2x" in r.data.tags["dlsearch.fail_reason"] for r in failed)


def test_populations_and_single_trials_share_the_gpus_without_over_committing_them(fake_gpus: None,
                                                                                   tmp_path: Path) -> None:
    """Mixed with populations: digits MLPs (the built-in loop; CUDA absent, so they train on the CPU
    while Ray accounts the GPUs), half a GPU per Tune trial, populations of 4 that refill. Every
    member of a population reports the one device and share its Tune trial got; a trial that does
    not stack (sgd beside adam) runs as a Tune trial of its own, on a share of its own."""
    n_trials = 8
    path = write_study(tmp_path, name="mixed", budget={"trials": n_trials}, train={"epochs": 2},
                       resources={"gpus_per_trial": 0.5, "cpus_per_trial": 1, "max_concurrent": "auto",
                                  "population": 4},
                       tracking={"register_best": False})
    spans: dict[str, list[float]] = {}  # a Tune trial (population id or trial number) -> first, last epoch seen
    tune_trial_of: dict[int, str] = {}

    def on_event(kind: str, info: dict) -> None:
        if kind == "epoch":
            key = info.get("population") or f"trial {info['number']}"
            tune_trial_of[info["number"]] = key
            spans.setdefault(key, [time.monotonic()] * 2)[1] = time.monotonic()

    summary = run_study(load_spec(path), on_event=on_event)
    assert summary.n_complete + summary.n_pruned == n_trials and summary.n_failed == 0
    runs = {int(r.data.tags["dlsearch.trial_number"]): r.data.tags for r in _runs(tmp_path, "mixed")}
    assert sorted(runs) == list(range(n_trials))
    device: dict[str, set[str]] = {}
    for number, tags in runs.items():
        assert tags["dlsearch.gpus"] in {"0", "1"} and float(tags["dlsearch.gpu_share"]) == 0.5
        assert tags["dlsearch.gpu_memory_fraction"] == "0.5"  # the cap each would set on a real GPU
        device.setdefault(tune_trial_of[number], set()).add(tags["dlsearch.gpus"])
    populations = [key for key in device if not key.startswith("trial ")]
    assert populations and all(len(gpus) == 1 for gpus in device.values())  # a population is on one GPU
    assert len(spans) < n_trials  # members of a population share one Tune trial, one device
    # No GPU over-committed: Tune trials seen training at the same moment hold at most one GPU each.
    for moment in sorted(start for start, _ in spans.values()):
        for gpu in ("0", "1"):
            held = sum(0.5 for key, (start, end) in spans.items() if gpu in device[key] and start <= moment <= end)
            assert held <= 1.0, (gpu, moment, spans, device)
