"""Trials per GPU-minute: one trial per GPU vs trials sharing it vs batched populations.

Goals (issue "GPUs kept full"): at least 10x the MNIST-MLP trials per GPU-minute of one trial per
GPU when several trials share the GPU, and at least 50x with batched populations; what a study
finds must not change with the packing.

`python -m bench gpu` (one GPU; under 8 minutes on an H100 or H200 with 16 CPU cores) runs the
study bench/gpu_mnist.yaml once per case, each as `python -m dlsearch run bench/gpu_mnist.yaml
--set ...` in a subprocess whose stores (MLflow, artifacts, Optuna, Tune's folder) are a fresh
temporary folder that is also its working directory. A case differs from the others only in its
`--set` items (`resources.*`, `budget.*`):

- one trial per GPU: gpus_per_trial 1, max_concurrent 1;
- 2 / 4 / 8 trials share the GPU: gpus_per_trial 0.5 / 0.25 / 0.125, max_concurrent 2 / 4 / 8
  (a trial may then allocate at most its share of the GPU's memory);
- populations of K = 16 / 64 / 256: resources.population K, one population on the GPU at a time
  (gpus_per_trial 1, max_concurrent 1): K trials trained as one stacked model, refilled with newly
  asked trials as members end until the budget is asked (so K=16 trains its 256 trials in one
  population, 16 at a time); the study file saves a population's state every 3 rounds.

Every case has cpus_per_trial 1 (of 16 cores: 8 trials at once leave the driver and Ray room).
`budget.trials` is sized per case so that it takes about 30-60 s on one H100 (estimates written
before any GPU run; see CASES). As a guard, every case also gets `budget.timeout_s` (Tune's time
budget): its share of what is left of DEADLINE_S, at least MIN_CAP_S and at most MAX_CAP_S; a case
that reaches it ends with its running trials interrupted (counted apart, not as finished), and its
row says so. The cases run in RUN_ORDER (the baseline first, the populations next); rows and the
JSON keep the order of CASES.

Figures per case:

- wall: `time.perf_counter` from the subprocess's start to its exit (interpreter, imports, Ray's
  start-up and shutdown, the stores, the study's closing plots: all of it counts);
- trials finished: COMPLETE trials in the case's Optuna storage (no pruner: every trial trains
  every epoch; early stopping cannot fire), read after the process exited;
- trials per GPU-minute = trials finished / (wall in minutes x 1 GPU); the ratio divides it by
  the one-trial-per-GPU case's; the goals are judged on these. For reference, the same over the
  span from the first trial's start to the last trial's end (Optuna's timestamps), which leaves
  the process's start-up and the study's end out;
- GPU utilisation and memory: `nvidia-smi --query-gpu=utilization.gpu,memory.used
  --format=csv,noheader,nounits -lms 500` read by a background thread over the whole process;
  mean and highest utilisation, and the highest memory.used, which is what the driver sees of the
  device: every process's CUDA context and caching allocator included (not
  `torch.cuda.max_memory_allocated`, which only a trial's own process sees), and the memory.used
  just before the case started;
- best val_accuracy of the case, and over the trials every case finished: the sampler is random
  with the study's seed and the driver asks trials one after another, so trial n has the same
  parameters in every case, and what packing changes shows up trial by trial (the largest
  difference of one trial's val_accuracy across cases is reported too).

`python -m bench gpu --dry-run` runs the same code path on the CPU with tiny budgets
(`resources.gpus_per_trial=0`, 600 MNIST samples, 1 epoch, 2-3 trials per case), prints the
same lines, and writes the section it would write, marked dry run, to a temporary file only:
BENCHMARKS.md and bench/out/ stay as they are.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import REPO, load_1min, store_overrides

HEADING = "## GPU: trials per GPU-minute, one trial per GPU vs shared GPUs vs batched populations (`bench/gpu.py`)"
STUDY = "bench/gpu_mnist.yaml"
GOAL_SHARED, GOAL_POPULATION = 10.0, 50.0  # x the trials per GPU-minute of one trial per GPU
CPUS_PER_TRIAL = 1
DEADLINE_S = 420.0  # every case of a GPU run together; the machine's start and the install come on top
MAX_CAP_S, MIN_CAP_S = 90.0, 25.0  # budget.timeout_s of one case
OUTSIDE_TUNE_S = 25.0  # a case's time outside Tune's budget (start-up, the study's end), estimated
SAMPLE_MS = 500
DRY_OVERRIDES = ("data.subset=600", "train.epochs=1")  # with resources.gpus_per_trial=0
DRY_AT_ONCE = 2  # cases the dry run runs at a time (each a `dlsearch run` with its own local Ray)
COMMAND = "python -m bench gpu"
TABLE_HEAD = (
    ("| case | `resources.*` | trials finished (budget) | wall s | **trials per GPU-minute** | × one trial per GPU "
     "| in-study trials per GPU-minute | GPU util. mean / max % | peak GPU memory MiB (idle before) "
     "| best val_accuracy | best over the common trials | load (1 min) |"),
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
)
GOALS = (
    f"several trials per GPU: ≥ {GOAL_SHARED:g}× the MNIST-MLP trials per GPU-minute of one trial per GPU",
    f"batched populations: ≥ {GOAL_POPULATION:g}× the trials per GPU-minute of one trial per GPU",
    "packing does not change what is found: best val_accuracy per case, and over the trials every case finished",
    "peak GPU memory per trial (`torch.cuda.max_memory_allocated`)",
)
# The device tool's machines reach no registry and get the repository only (not ../shared): the MNIST
# files and the wheels of dlsearch's dependencies travel in .gpu/ (git-ignored via .git/info/exclude,
# named in the run's `carry`); BENCHMARKS.md and the raw numbers come back through $OUT.
DEVICE_COMMAND = ('python3 -m pip install -q --no-index --no-build-isolation --find-links .gpu/whl -e . '
                  '&& DLSEARCH_DATA_DIR=.gpu/data python3 -m bench gpu; cp BENCHMARKS.md bench/out/gpu.json "$OUT"/')


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    gpus_per_trial: float
    max_concurrent: int
    population: int
    trials: int  # budget.trials on a GPU
    dry_trials: int  # budget.trials of --dry-run

    @property
    def kind(self) -> str:
        return "one" if self.key == "one" else ("population" if self.population > 1 else "shared")

    def overrides(self, dry: bool, timeout_s: float | None) -> list[str]:
        sets = [
            f"resources.cpus_per_trial={CPUS_PER_TRIAL}",
            f"resources.gpus_per_trial={0 if dry else self.gpus_per_trial:g}",
            f"resources.max_concurrent={self.max_concurrent}",
            f"resources.population={self.population}",
            f"budget.trials={self.dry_trials if dry else self.trials}",
        ]
        if timeout_s is not None:
            sets.append(f"budget.timeout_s={timeout_s:.0f}")
        return sets + (list(DRY_OVERRIDES) if dry else [])

    def resources(self, dry: bool = False) -> str:
        """The case's `resources.*` items as a row shows them."""
        text = f"gpus_per_trial {0 if dry else self.gpus_per_trial:g}, max_concurrent {self.max_concurrent}"
        return text + (f", population {self.population}" if self.population > 1 else "")


# Budgets: estimates for one H100 (no GPU run had been made when they were set): a trial of 3 epochs
# over 10,800 images with its test evaluation about 1 s on its own; sharing the GPU scales with the
# trials at once until the driver (about 0.1-0.2 s per trial: ask, MLflow run, tell) limits it; a
# population costs the driver about 50-100 ms per member. Each case should take 30-60 s.
CASES = (
    Case("one", "1 trial per GPU", 1.0, 1, 1, trials=24, dry_trials=2),
    Case("share2", "2 trials share the GPU", 0.5, 2, 1, trials=48, dry_trials=2),
    Case("share4", "4 trials share the GPU", 0.25, 4, 1, trials=96, dry_trials=2),
    Case("share8", "8 trials share the GPU", 0.125, 8, 1, trials=160, dry_trials=2),
    Case("pop16", "population K=16", 1.0, 1, 16, trials=256, dry_trials=3),
    Case("pop64", "population K=64", 1.0, 1, 64, trials=256, dry_trials=3),
    Case("pop256", "population K=256", 1.0, 1, 256, trials=256, dry_trials=3),
)
# The baseline first; then the cases whose trials take longest (a population of 256 must finish whole
# within its cap), so that the shortest caps, if the deadline bites, fall on the cases of smallest steps.
RUN_ORDER = ("one", "pop256", "pop64", "pop16", "share8", "share4", "share2")


# ---------------------------------------------------------------- the suite's four names


def run(quick: bool = False) -> dict[str, Any]:
    """Every case on the GPU; `quick` is the dry run on the CPU (it writes a temporary file only)."""
    dry = quick
    gpu_index = _gpu_index()
    if not dry:
        _check_gpu()
    env = _env(dry)
    gpu = _gpu_info(gpu_index) if not dry else None
    started = time.perf_counter()
    by_key: dict[str, dict[str, Any]] = {}
    order = sorted(CASES, key=lambda c: RUN_ORDER.index(c.key))
    ran: list[dict[str, Any]] = []
    if dry:  # it proves each case's command on the CPU, its timings mean nothing: two cases at a time
        with ThreadPoolExecutor(DRY_AT_ONCE) as pool:
            ran = list(pool.map(lambda case: _run_case(case, True, None, env, gpu_index), order))
    for i, case in enumerate(order):
        if dry:
            r = ran[i]
        else:
            cap = _cap(DEADLINE_S - (time.perf_counter() - started), len(order) - i)
            r = _run_case(case, dry, cap, env, gpu_index)
        if dry and r["error"]:
            raise RuntimeError(f"gpu --dry-run: case {case.key} failed: {r['error']}")
        r["run_order"] = i
        by_key[case.key] = r
        print(f"  ... {case.key} done: {_line(case, r, by_key['one'])}", file=sys.stderr, flush=True)
    runs = [by_key[c.key] for c in CASES]
    from bench import machine, versions

    result: dict[str, Any] = {
        "dry_run": dry,
        "study": STUDY,
        "cpus_per_trial": CPUS_PER_TRIAL,
        "deadline_s": DEADLINE_S,
        "dry_overrides": list(DRY_OVERRIDES) if dry else [],
        "gpu": gpu,
        "machine": machine(),
        "versions": versions(),
        "total_s": time.perf_counter() - started,
        "cases": [asdict(c) for c in CASES],
        "runs": runs,
    }
    result.update(_compare(runs))
    if dry:
        path = Path(tempfile.mkdtemp(prefix="bench-gpu-dry-run-")) / "BENCHMARKS-gpu-dry-run.md"
        path.write_text(f"{HEADING}\n\n{markdown(result)}\n")
        result["dry_run_markdown"] = str(path)
    return result


def summary(result: dict[str, Any]) -> list[str]:
    dry = result["dry_run"]
    where = ("DRY RUN on the CPU (resources.gpus_per_trial=0, tiny budgets): the figures mean nothing"
             if dry else f"{_gpu_name(result)}, {result['machine']['cpu_count']} CPUs")
    lines = [(f"gpu: {STUDY} through `dlsearch run`, one subprocess per case; {where}; "
              f"trials/min are per GPU-minute on one GPU; {result['total_s']:.0f} s in all")]
    base = result["runs"][0]
    for case, r in zip(CASES, result["runs"]):
        lines.append(f"  {case.key}: {_line(case, r, base)}")
    lines.append(
        f"  goals: shared >= {GOAL_SHARED:g}x one trial per GPU: {_goal_text(result['shared_best'], dry)}; "
        f"populations >= {GOAL_POPULATION:g}x: {_goal_text(result['population_best'], dry)}")
    c = result["common"]
    if c["n"]:
        lines.append(
            f"  same trials in every case: {c['n']} trial numbers finished everywhere, with the same parameters in "
            f"every case: {'yes' if c['same_params'] else 'NO'}; best val_accuracy over them "
            f"{_fmt(c['best_min'])} to {_fmt(c['best_max'])}; largest difference of one trial's val_accuracy "
            f"across cases {_fmt(c['max_abs_diff'])}")
    else:
        lines.append("  same trials in every case: no trial number finished in every case")
    if dry:
        lines.append(f"  dry run: BENCHMARKS.md and bench/out/ are untouched; the section it would write (marked "
                     f"dry run) is in {result['dry_run_markdown']}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    dry = result["dry_run"]
    head = _intro()
    if dry:
        head += ("\n\n**DRY RUN on the CPU** (`python -m bench gpu --dry-run`: `resources.gpus_per_trial=0`, "
                 f"`--set {' --set '.join(result['dry_overrides'])}`, 2-3 trials per case): these rows prove the "
                 "command end to end; their figures say nothing about a GPU.")
    g = result["gpu"] or {}
    head += (f"\n\nMachine: {_gpu_name(result)}"
             + (f" ({g.get('memory_total_mib', '?')} MiB, driver {g.get('driver', '?')})" if g else "")
             + f", {m['cpu_count']} CPUs, {m['platform']}; {m['date']}; torch {v['torch']}, Ray {v['ray']}, "
             f"Optuna {v['optuna']}, MLflow {v['mlflow']}. GPU figures from nvidia-smi (whole device, every "
             "process).")
    rows = list(TABLE_HEAD)
    base = result["runs"][0]
    for case, r in zip(CASES, result["runs"]):
        finished = f"{r['complete']} ({r['budget']})"
        if r["interrupted"]:
            finished += f", {r['interrupted']} interrupted at the {r['timeout_s']:.0f} s cap"
        if r["failed"]:
            finished += f", {r['failed']} failed"
        if r["error"]:
            finished += f"; exit {r['returncode']}"
        util = (f"{r['gpu']['util_mean']:.0f} / {r['gpu']['util_max']:.0f}" if r["gpu"] else "no nvidia-smi")
        mem = (f"{r['gpu']['mem_peak_mib']:.0f} ({r['gpu']['mem_idle_mib']:.0f})" if r["gpu"] else "—")
        rows.append(
            f"| {case.label} | {case.resources(dry)} "
            f"| {finished} | {r['wall_s']:.1f} | **{_fmt(r['trials_per_min'], '.1f')}** "
            f"| {_ratio(r, base)} | {_fmt(r['study_trials_per_min'], '.1f')} | {util} | {mem} "
            f"| {_fmt(r['best'])} | {_fmt(r['best_common'])} | {r['load_1min']:.1f} |")
    c = result["common"]
    goals = [
        "| goal | measured | met |", "|---|---|---|",
        f"| {GOALS[0]} | {_goal_measured(result['shared_best'])} | {_goal_met(result['shared_best'], dry)} |",
        f"| {GOALS[1]} | {_goal_measured(result['population_best'])} | {_goal_met(result['population_best'], dry)} |",
        (f"| {GOALS[2]} | {c['n']} trials finished in every case, with the same parameters everywhere: "
         f"{'yes' if c['same_params'] else 'no'}; best {_fmt(c['best_min'])} to "
         f"{_fmt(c['best_max'])}; one trial's val_accuracy differs by at most {_fmt(c['max_abs_diff'])} across "
         "cases | |"),
        f"| {GOALS[3]} | not measured here: `python -m bench memory` on a GPU | |",
    ]
    budgets = ", ".join(f"{c.label} {r['budget']}" for c, r in zip(CASES, result["runs"]))
    caps = ", ".join(f"{r['timeout_s']:.0f}" for r in result["runs"] if r["timeout_s"])
    tail = (f"\n\nBudgets (trials): {budgets}"
            + (f"; `budget.timeout_s` of each case in turn: {caps} s" if caps else "; no `budget.timeout_s`")
            + f". All cases together took {result['total_s']:.0f} s. "
            + ("Raw numbers: not written (dry run)." if dry else "Raw numbers: `bench/out/gpu.json`."))
    return head + "\n\n" + "\n".join(rows) + "\n\n" + "\n".join(goals) + tail


def placeholder() -> str:
    """The section's body before any GPU run: what to run, and the rows it fills (every one not measured)."""
    rows = list(TABLE_HEAD)
    for case in CASES:
        rows.append(f"| {case.label} | {case.resources()} | not measured ({case.trials}) "
                    + "| not measured " * (len(TABLE_HEAD[1].split("|")) - 5) + "|")
    goals = ["| goal | measured | met |", "|---|---|---|",
             *(f"| {goal} | not measured (no GPU) | |" for goal in GOALS)]
    return (_intro() + "\n\nNo GPU has been lent to a session so far (the device tool's `status` said "
            "`can_start_another: false`, last on 2026-12-07): every figure in this file was measured on 2 shared "
            "CPU cores, and the rows below are **not measured**. `python -m bench gpu` fills them; "
            "`python -m bench gpu --dry-run` (CI, `tests/test_bench.py`) runs every case on the CPU with tiny "
            "budgets and writes nothing here. What a GPU run exercises is built and tested on the CPU where it can "
            "be: data resident on the device, bf16/fp16 autocast, `train.memory_format` (channels_last for CNNs on "
            "CUDA; NHWC equals NCHW's curve in `tests/test_train.py`), `train.compile` (inductor; equal curve, plain "
            "checkpoint keys), fractional `gpus_per_trial` with a per-trial memory cap, out-of-memory trials run "
            "again with twice the resources (`tests/test_custom.py`, with a real failing host allocation), and "
            "`resources.population`; `python -m bench loop memory` use CUDA when it is there.\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(goals))


# ---------------------------------------------------------------- one case


def _run_case(case: Case, dry: bool, timeout_s: float | None, env: dict[str, str],
              gpu_index: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{case.key}-") as tmp:
        folder = Path(tmp)
        sets = case.overrides(dry, timeout_s) + store_overrides(folder)
        cmd = [sys.executable, "-m", "dlsearch", "run", str(REPO / STUDY), *[x for s in sets for x in ("--set", s)]]
        load = load_1min()
        idle = _gpu_sample(gpu_index)
        hard_limit = 900.0 if dry else (timeout_s or MAX_CAP_S) + 180.0
        with GpuSampler(gpu_index) as sampler, \
                tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            rc = _wait(proc, hard_limit)
            wall = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        error = f"exit {rc}: {(stderr.strip() or stdout.strip())[-1500:]}" if rc != 0 else None
        try:
            trials = _read_trials(folder)
        except Exception as exc:  # noqa: BLE001 - one case's broken store must not cost the other cases
            trials, error = [], f"{error + '; ' if error else ''}its Optuna storage could not be read: {exc!r}"
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    interrupted = [t for t in trials if t["state"] == "FAIL" and t["fail_reason"] == "interrupted"]
    failed = [t for t in trials if t["state"] == "FAIL" and t["fail_reason"] != "interrupted"]
    best = max((t["value"] for t in complete), default=None)
    starts = [t["start"] for t in trials if t["start"] is not None]
    ends = [t["end"] for t in complete if t["end"] is not None]
    span = (max(ends) - min(starts)) if starts and ends else None
    return {
        "case": case.key,
        "cmd": cmd,
        "budget": case.dry_trials if dry else case.trials,
        "timeout_s": timeout_s,
        "returncode": rc,
        "error": error,
        "wall_s": wall,
        "complete": len(complete),
        "interrupted": len(interrupted),
        "failed": len(failed),
        "fail_reasons": sorted({t["fail_reason"] for t in failed}),
        "epochs": sum(t["epochs"] for t in complete),
        "trials_per_min": len(complete) / wall * 60 if wall > 0 else None,
        "span_s": span,
        "study_trials_per_min": len(complete) / span * 60 if span else None,
        "best": best,
        "best_number": next((t["number"] for t in complete if t["value"] == best), None),
        "values": {str(t["number"]): t["value"] for t in complete},
        "params": {str(t["number"]): t["params"] for t in complete},
        "gpu": sampler.stats(idle) if sampler.samples else None,
        "load_1min": load,
        "stdout_tail": stdout[-3000:],
    }


def _wait(proc: subprocess.Popen, limit_s: float) -> int:
    """The process's exit status; past `limit_s` it is stopped (SIGTERM: dlsearch saves and exits 130), then killed."""
    try:
        return proc.wait(timeout=limit_s)
    except KeyboardInterrupt:  # it runs in a session of its own: Ctrl-C here does not reach it
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        raise
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the driver and the Ray it started
            return proc.wait()


def _read_trials(folder: Path) -> list[dict[str, Any]]:
    """Every trial of the case's study, from its Optuna storage."""
    db = folder / "optuna.db"
    if not db.exists():
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    out = []
    for name in optuna.get_all_study_names(storage):
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            out.append({
                "number": t.number,
                "state": t.state.name,
                "value": t.value if t.state.name == "COMPLETE" else None,
                "params": dict(t.params),
                "fail_reason": str(t.user_attrs.get("fail_reason", "")),
                "epochs": int(t.user_attrs.get("epochs_run", 0) or 0),
                "start": t.datetime_start.timestamp() if t.datetime_start else None,
                "end": t.datetime_complete.timestamp() if t.datetime_complete else None,
            })
    return out


def _compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to one trial per GPU, the goals' best cases, and the trials every case finished."""
    base = runs[0]["trials_per_min"]
    for r in runs:
        r["ratio"] = r["trials_per_min"] / base if base and r["trials_per_min"] is not None else None

    def best_of(kind: str) -> dict[str, Any] | None:
        scored = [(r["ratio"], c) for c, r in zip(CASES, runs) if c.kind == kind and r["ratio"] is not None]
        if not scored:
            return None
        ratio, case = max(scored, key=lambda x: x[0])
        goal = GOAL_SHARED if kind == "shared" else GOAL_POPULATION
        return {"case": case.key, "label": case.label, "ratio": ratio, "goal": goal, "met": ratio >= goal}

    numbers = set.intersection(*(set(r["values"]) for r in runs)) if runs else set()
    for r in runs:
        r["best_common"] = max((r["values"][n] for n in numbers), default=None)
    diffs = [max(r["values"][n] for r in runs) - min(r["values"][n] for r in runs) for n in numbers]
    # The sampler's side of "packing changes nothing": trial n was given the same parameters everywhere.
    same_params = all(r["params"][n] == runs[0]["params"][n] for n in numbers for r in runs)
    bests = [r["best_common"] for r in runs if r["best_common"] is not None]
    return {
        "shared_best": best_of("shared"),
        "population_best": best_of("population"),
        "common": {"n": len(numbers), "numbers": sorted(numbers, key=int),
                   "best_min": min(bests, default=None), "best_max": max(bests, default=None),
                   "max_abs_diff": max(diffs, default=None), "same_params": same_params},
    }


def _cap(left_s: float, cases_left: int) -> float:
    """budget.timeout_s of the next case: its share of the time left, less what runs outside Tune's budget."""
    return max(MIN_CAP_S, min(MAX_CAP_S, left_s / cases_left - OUTSIDE_TUNE_S))


# ---------------------------------------------------------------- the GPU


class GpuSampler:
    """nvidia-smi's utilization.gpu and memory.used every SAMPLE_MS ms, read by a background thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.samples: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(SAMPLE_MS)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.thread = threading.Thread(target=self._read, name="bench-gpu-nvidia-smi", daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            sample = _parse_sample(line)
            if sample is not None:
                self.samples.append((time.perf_counter(), *sample))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def stats(self, idle: tuple[float, float] | None) -> dict[str, Any]:
        utils = [s[1] for s in self.samples]
        mems = [s[2] for s in self.samples]
        return {"n_samples": len(self.samples), "util_mean": sum(utils) / len(utils), "util_max": max(utils),
                "mem_peak_mib": max(mems), "mem_idle_mib": idle[1] if idle else math.nan}


def _parse_sample(line: str) -> tuple[float, float] | None:
    """`37, 1234` -> (37.0, 1234.0); None for anything else ([N/A], a warning line)."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        return None


def _gpu_sample(index: int) -> tuple[float, float] | None:
    """One reading of utilization.gpu and memory.used, or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _parse_sample(out.stdout.strip().splitlines()[0]) if out.stdout.strip() else None


def _gpu_info(index: int) -> dict[str, Any] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=False)
        name, memory, driver = [p.strip() for p in out.stdout.strip().splitlines()[0].split(",")[:3]]
        return {"index": index, "name": name, "memory_total_mib": memory, "driver": driver}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _gpu_index() -> int:
    """The GPU the cases run on, as nvidia-smi numbers it: the first of CUDA_VISIBLE_DEVICES, else 0."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def _check_gpu() -> None:
    """Refuse (exit 1, nothing written) without a CUDA build of torch and a visible GPU."""
    import torch

    if not torch.version.cuda:
        raise SystemExit(f"python -m bench gpu: torch {torch.__version__} is not a CUDA build; install the CUDA "
                         "build of PyTorch on the GPU machine (`python -m bench gpu --dry-run` runs on the CPU)")
    # device_count, not is_available or get_device_name: no CUDA context in this process while cases run
    if torch.cuda.device_count() < 1:
        raise SystemExit("python -m bench gpu: no CUDA GPU visible (`python -m bench gpu --dry-run` runs the same "
                         "cases on the CPU and writes nothing)")


def _env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if env.get("DLSEARCH_DATA_DIR"):  # each case runs in a temporary folder: a relative path would not resolve
        env["DLSEARCH_DATA_DIR"] = str(Path(env["DLSEARCH_DATA_DIR"]).resolve())
    if not dry and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU: the goals are per GPU
    return env


# ---------------------------------------------------------------- formatting


def _line(case: Case, r: dict[str, Any], base: dict[str, Any]) -> str:
    text = (f"{case.label}: wall {r['wall_s']:.1f} s, {r['complete']} trials finished (budget {r['budget']}"
            + (f", {r['interrupted']} interrupted at the {r['timeout_s']:.0f} s cap" if r["interrupted"] else "")
            + (f", {r['failed']} failed" if r["failed"] else "")
            + f"), {_fmt(r['trials_per_min'], '.1f')} trials/min, {_ratio(r, base)} one trial per GPU")
    if r["gpu"]:
        g = r["gpu"]
        text += (f"; GPU util mean {g['util_mean']:.0f}% (max {g['util_max']:.0f}%), "
                 f"peak memory {g['mem_peak_mib']:.0f} MiB (idle {g['mem_idle_mib']:.0f})")
    else:
        text += "; no nvidia-smi"
    text += f"; best val_accuracy {_fmt(r['best'])}"
    if r["error"]:
        text += f"; FAILED {r['error'].splitlines()[0][:200]}"
    return text


def _ratio(r: dict[str, Any], base: dict[str, Any]) -> str:
    if not base["trials_per_min"] or r["trials_per_min"] is None:
        return "—"
    return f"{r['trials_per_min'] / base['trials_per_min']:.2f}x"


def _gpu_name(result: dict[str, Any]) -> str:
    g = result.get("gpu")
    if g:
        return g["name"]
    return result["machine"].get("cuda") or "no GPU"


def _goal_text(best: dict[str, Any] | None, dry: bool) -> str:
    if best is None:
        return "not measured"
    verdict = "dry run: not judged" if dry else ("met" if best["met"] else "NOT met")
    return f"{best['ratio']:.2f}x ({best['label']}), {verdict}"


def _goal_measured(best: dict[str, Any] | None) -> str:
    return "—" if best is None else f"{best['ratio']:.2f}× ({best['label']})"


def _goal_met(best: dict[str, Any] | None, dry: bool) -> str:
    if dry:
        return "dry run: not judged"
    return "—" if best is None else ("yes" if best["met"] else "no")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _intro() -> str:
    cases = "; ".join(f"{c.label}: `{c.resources()}`" for c in CASES)
    return (
        f"MNIST-MLP trials per GPU-minute on one GPU (`{COMMAND}`, under 8 minutes on one H100 or H200 with 16 CPU "
        f"cores): the study `{STUDY}` (an MLP 784-256-256-10, 3 epochs over 10,800 training images, a random "
        "sampler with the study's seed, no pruner, early stopping that cannot fire, a search over lr, weight "
        "decay, adam/adamw, dropout and init, so every trial stacks into a population) run once per case as "
        "`dlsearch run` in a subprocess, every store in a fresh temporary folder, with `--set "
        f"resources.cpus_per_trial={CPUS_PER_TRIAL}` and the case's resources: {cases}. Each case's `budget.trials` "
        "is sized for about 30-60 s on one H100; as a guard it also runs under `budget.timeout_s` (its share of "
        f"the {DEADLINE_S:.0f} s all cases may take, at most {MAX_CAP_S:.0f} s), and trials that cap interrupts "
        "are counted apart, not as finished. Wall time is from the "
        "process's start to its exit; trials per GPU-minute = COMPLETE trials / wall minutes; the in-study figure "
        "divides by the span from the first trial's start to the last trial's end instead. GPU utilisation and "
        "memory come from `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits "
        f"-lms {SAMPLE_MS}`, sampled by a background thread while the case runs: the whole device as the driver "
        "sees it (every process's CUDA context and cached memory; `torch.cuda.max_memory_allocated` is only "
        "visible inside a trial). Trial n has the same parameters in every case, so \"best over the common "
        "trials\" compares the cases on the trials they all finished. The module docstring of `bench/gpu.py` has "
        "the details.\n\n"
        "Run it on a GPU machine after the README's install, where torch must be the CUDA build (not the CPU "
        f"wheel the README installs first): `pip install -e . && DLSEARCH_DATA_DIR=../shared/data {COMMAND}`. "
        "In a session lent a machine through the device tool (torch there is already a CUDA build; no package "
        "registry is reachable and `../shared` does not travel), the one command, with `carry: [\".gpu\"]`, is "
        f"`{DEVICE_COMMAND}`, after `.gpu/` was filled here: the MNIST files in `.gpu/data/mnist` and the "
        "cp312 manylinux wheels of dlsearch's dependencies but torch in `.gpu/whl`. A call carries at most 64 MiB "
        "and Ray 2.60's cp312 wheel alone is 79 MB, so as things stand the dependencies cannot travel in one call."
    )
