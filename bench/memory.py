"""How much memory does one trial of dlsearch's training loop take, against a bare loop?

No goal yet: this measures the peak resident memory (RSS) of one trial, and where it comes from.

Each case runs one trial per side, each in a fresh Python process (`python -m bench.memory
CASE`, started from here one after another, bare side first), which records its memory at three
points:

1. after the imports: torch, `dlsearch.trial.data`, `dlsearch.trial.train`, `dlsearch.config.spec`,
   `dlsearch.config.trial_config` and `bench.loop` (both sides import the same modules), and what torch
   imports only when the first optimizer is built (one Adam step on a one-weight model);
2. after the data is loaded: `dlsearch.trial.data.load_data` on the study's `data:` section, as
   `bench/loop.py` loads it (the split tensors in memory, normalized);
3. after training `train.epochs` epochs from scratch: dlsearch's side runs
   `dlsearch.trial.train.train_trial` with a report callable that writes each checkpoint with
   `torch.save` to a temporary file as the Ray trainable does (Ray and Tune themselves are not
   loaded); the bare side runs `bench.loop.bare_run`, the least a hand-written loop does for the
   same model, data and optimizer (its module docstring lists it).

At each point it reads the peak RSS of the phase that just ended (`VmHWM` in /proc/self/status)
and the RSS now (`VmRSS`), then starts the next phase's peak afresh by writing 5 to
/proc/self/clear_refs (which sets the kernel's high-water mark to the RSS now). Without that
reset the data loader's transient (it reads all 70,000 MNIST images before it subsets) would
hide a smaller training peak. The trial's peak is the largest of the three phase peaks;
"training above data" is the training phase's peak minus the RSS once the data was loaded: what
the model, optimizer, activations, the evaluation passes and (dlsearch) the best-weights copy,
the checkpoints and the end-of-trial test pass add. The ratios compare the two sides of the same
case in the same run.

Not `getrusage(RUSAGE_SELF).ru_maxrss`: on Linux a process started with fork + exec inherits its
parent's peak there, so every child of a parent that has imported torch would report at least
the parent's peak, and it cannot be reset per phase. It is used only where /proc is missing (the
result says so; its peaks are then cumulative).

The data bundle's tensor bytes (the six split tensors, features float32, labels int64) are
reported per case. Where CUDA is available the trial trains on the GPU (`train.device: auto`) and
`torch.cuda.max_memory_allocated()` over the training is recorded too; without a GPU that figure
is absent and the section says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import REPO, load_1min, machine

HEADING = "## Peak memory per trial: dlsearch vs a bare loop (`bench/memory.py`)"
SIDES = ("bare", "dlsearch")
_RESULT = "BENCH_MEMORY_RESULT "  # the child's last stdout line: this prefix, then its JSON
_MIB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    study: str  # relative to the repository root
    overrides: tuple[str, ...]  # `--set` items on top of the study file
    epochs: int


def cases(quick: bool) -> list[Case]:
    if quick:  # the MLP only: a CNN trial's end-of-trial test pass (10,000 images) takes too long for a smoke run
        return [Case("MNIST MLP (quick)", "studies/mnist.yaml", ("data.subset=2000",), epochs=1)]
    return [
        Case("MNIST MLP", "studies/mnist.yaml", (), epochs=2),
        Case("MNIST CNN", "studies/mnist_cnn.yaml", ("data.subset=10000",), epochs=2),
    ]


def run(quick: bool = False) -> dict[str, Any]:
    """Measure every case, each side in its own process; JSON-ready results."""
    results = []
    for case in cases(quick):
        sides = {side: _in_child(case, side) for side in SIDES}
        bare, dls = sides["bare"], sides["dlsearch"]
        results.append({
            **asdict(case),
            "sides": sides,
            "peak_ratio": dls["peak_mib"] / bare["peak_mib"],
            "training_above_data_ratio": _above_data(dls) / max(_above_data(bare), 1e-9),
        })
    return {"machine": machine(), "cases": results}


def summary(result: dict[str, Any]) -> list[str]:
    lines = []
    for c in result["cases"]:
        b, d = c["sides"]["bare"], c["sides"]["dlsearch"]
        gpu = (f"; GPU peak allocated bare {_mib(b['cuda_max_allocated'])}, dlsearch {_mib(d['cuda_max_allocated'])} MiB"
               if d["cuda_max_allocated"] is not None else "; no GPU")
        lines.append(
            f"memory: {c['name']} ({d['data']}, data tensors {d['data_mib']:.1f} MiB): peak RSS bare "
            f"{b['peak_mib']:.0f} MiB, dlsearch {d['peak_mib']:.0f} MiB (ratio {c['peak_ratio']:.3f}); "
            f"training above data bare {_above_data(b):.0f} MiB, dlsearch {_above_data(d):.0f} MiB "
            f"(ratio {c['training_above_data_ratio']:.2f}){gpu}"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = [
        ("| case | side | data | data tensors MiB | imports: peak MiB | data load: peak / after MiB "
         "| training: peak / after MiB | **trial peak MiB** | training above data MiB | GPU peak allocated MiB |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = ["| case | peak RSS, dlsearch / bare | training above data, dlsearch / bare |", "|---|---:|---:|"]
    for c in result["cases"]:
        for side in SIDES:
            s = c["sides"][side]
            gpu = _mib(s["cuda_max_allocated"]) if s["cuda_max_allocated"] is not None else "no GPU"
            rows.append(
                f"| {c['name']} | {side} | {s['data']}, {c['epochs']} epoch(s) | {s['data_mib']:.1f} "
                f"| {s['imports']['peak_mib']:.0f} | {s['data_loaded']['peak_mib']:.0f} / {s['data_loaded']['now_mib']:.0f} "
                f"| {s['trained']['peak_mib']:.0f} / {s['trained']['now_mib']:.0f} | **{s['peak_mib']:.0f}** "
                f"| {_above_data(s):.0f} | {gpu} |"
            )
        ratios.append(f"| {c['name']} | {c['peak_ratio']:.3f} | {c['training_above_data_ratio']:.2f} |")
    runs = "; ".join(f"{c['name']}: {c['study']} {' '.join('--set ' + o for o in c['overrides'])}".rstrip()
                     + f", train.epochs={c['epochs']} ({_model(c['sides']['dlsearch'])})" for c in result["cases"])
    sides = [s for c in result["cases"] for s in c["sides"].values()]
    if any(s["source"] != "proc" for s in sides):
        source = "`ru_maxrss` (no /proc here: the peaks are cumulative and include the parent process's)"
    elif all(s["phase_peaks"] for s in sides):
        source = "`VmHWM` / `VmRSS` in /proc/self/status, the peak reset between phases through /proc/self/clear_refs"
    else:
        source = "`VmHWM` / `VmRSS` in /proc/self/status (the kernel refused the reset: the peaks are cumulative)"
    loads = [s["load_1min"] for s in sides]
    gpu = ("" if m["cuda"] else
           "\n\nNo GPU was available on this machine, so there is no `torch.cuda.max_memory_allocated` figure; "
           "every trial trained on the CPU.")
    return (
        "Peak resident memory of one trial (`python -m bench memory`), each side in a fresh process that "
        "imports the same modules, loads the study's data with `dlsearch.trial.data.load_data` and trains one trial "
        "from scratch: dlsearch's `train_trial` (checkpoints written with `torch.save` to a temporary file "
        "each epoch, as the Ray trainable does; Ray itself is not loaded) or `bench/loop.py`'s bare loop on "
        f"the same model, data and optimizer. Memory is read from {source}: each phase (imports, data load, "
        "training) has its own peak, the trial's peak is the largest, and \"training above data\" is the training "
        "phase's peak minus the RSS once the data was loaded. The module docstring of `bench/memory.py` has "
        "the details.\n\n"
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs; {m['date']}; torch {m['torch']}, Python {m['python']}.\n\n"
        + "\n".join(rows) + "\n\nSame-run ratios:\n\n" + "\n".join(ratios)
        + "\n\nThe bare loop has no test pass; dlsearch's trial ends with one over the whole test split, in "
        "batches of up to 4,096 images like its validation passes (`dlsearch.trial.train.evaluate`). With a CNN one such "
        "batch's activations take hundreds of MiB, so a trial whose validation split is smaller than that "
        "batch peaks in its test pass. Where the data loader's peak is the largest (it reads every image "
        "before it subsets and normalizes), both sides share it."
        + f"\n\nRuns: {runs}. The 1-minute load average before each process was "
        f"{', '.join(f'{x:.1f}' for x in loads)} on {m['cpu_count']} CPUs (it slows the runs; it does not change "
        "what they allocate). Raw numbers: `bench/out/memory.json`." + gpu
    )


# ---------------------------------------------------------------- measuring


def _in_child(case: Case, side: str) -> dict[str, Any]:
    """Run one side of `case` in a fresh `python -m bench.memory` and return what it measured."""
    load = load_1min()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps({**asdict(case), "side": side})],
        cwd=REPO, capture_output=True, text=True, timeout=1800, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench.memory child for {case.name} ({side}) exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len(_RESULT):]), "load_1min": load, "wall_s": time.perf_counter() - started}


def _model(side: dict[str, Any]) -> str:
    m = side["model"]
    keys = ("depth", "channels", "width", "norm") if m["kind"] == "cnn" else ("depth", "width", "norm")
    shape = ", ".join(f"{k} {m[k]}" for k in keys if m.get(k) is not None)
    return f"{m['kind']}: {shape}; {m['n_params']:,} weights; batch {side['batch_size']}"


def _above_data(side: dict[str, Any]) -> float:
    return side["trained"]["peak_mib"] - side["data_loaded"]["now_mib"]


def _mib(n_bytes: int | None) -> str:
    return f"{n_bytes / _MIB:.1f}" if n_bytes is not None else "-"


def _memory_now() -> dict[str, Any]:
    """The peak RSS since the last `_new_peak` (or the start) and the RSS now, in MiB."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"peak_mib": int(fields["VmHWM"].split()[0]) / 1024, "now_mib": int(fields["VmRSS"].split()[0]) / 1024,
                "source": "proc"}
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = peak / _MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
        return {"peak_mib": peak_mib, "now_mib": peak_mib, "source": "ru_maxrss"}


def _new_peak() -> bool:
    """Start a new peak: Linux (4.0+) sets the RSS high-water mark to the RSS now. False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child(case: Case, side: str) -> dict[str, Any]:
    """One side of one case in this (fresh) process: memory after imports, data, and training."""
    import torch

    from bench.loop import bare_run
    from dlsearch.config.trial_config import trial_config
    from dlsearch.trial.data import DataBundle, load_data
    from dlsearch.config.spec import load_spec
    from dlsearch.trial.train import resolve_device, train_trial

    _import_lazily_loaded_modules()
    imports = _memory_now()
    phase_peaks = _new_peak()
    spec = load_spec(REPO / case.study, [*case.overrides, f"train.epochs={case.epochs}"])
    cfg = trial_config(spec, {}, number=0)
    device = resolve_device(cfg.train.device)
    data = load_data(cfg.data, cfg.data_seed, device)
    assert isinstance(data, DataBundle), type(data)  # the MNIST studies load in-memory tensors
    tensors = [data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test]
    data_loaded = _memory_now()
    phase_peaks = _new_peak() and phase_peaks

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if side == "dlsearch":
            def report(epoch: int, metrics: Any, checkpoint: dict | None = None) -> None:
                if checkpoint is not None:
                    torch.save(checkpoint, Path(tmp) / "state.pt")  # as dlsearch.trainable does each epoch

            result = train_trial(cfg, data, report)
            if result.state != "COMPLETE" or result.epochs_run != case.epochs:
                raise RuntimeError(f"dlsearch ran {result.epochs_run} of {case.epochs} epochs ({result.state}: "
                                   f"{result.fail_reason})")
        elif side == "bare":
            bare_run(cfg, data, lambda *_: None)
        else:
            raise ValueError(f"side must be one of {', '.join(SIDES)} (got {side!r})")
    if cuda:
        torch.cuda.synchronize()
    trained = _memory_now()
    from dlsearch.trial.models import build_model  # after the last reading: only to count the weights

    n_params = sum(p.numel() for p in build_model(cfg.model, data.input_shape, data.n_classes).parameters())
    return {
        "side": side,
        "device": str(device),
        "data": f"{len(data.y_train)} train / {len(data.y_val)} val / {len(data.y_test)} test",
        "model": {**cfg.model.model_dump(include={"kind", "depth", "width", "channels", "norm"}), "n_params": n_params},
        "batch_size": cfg.train.batch_size,
        "data_bytes": sum(t.element_size() * t.nelement() for t in tensors),
        "data_mib": sum(t.element_size() * t.nelement() for t in tensors) / _MIB,
        "imports": imports,
        "data_loaded": data_loaded,
        "trained": trained,
        "peak_mib": max(imports["peak_mib"], data_loaded["peak_mib"], trained["peak_mib"]),
        "phase_peaks": phase_peaks,  # False: each peak is the process's peak so far
        "source": trained["source"],
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
    }


def _import_lazily_loaded_modules() -> None:
    """One Adam step on a one-weight model: torch imports torch._dynamo (~80 MiB) when the first
    optimizer is built, which would otherwise count as training on both sides alike."""
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    optimizer.step()


if __name__ == "__main__":
    from bench import use_shared_data

    use_shared_data()
    job = json.loads(sys.argv[1])
    side = job.pop("side")
    job["overrides"] = tuple(job["overrides"])
    print(_RESULT + json.dumps(_child(Case(**job), side)), flush=True)
