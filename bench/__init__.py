"""dlsearch's benchmark suite: `python -m bench [--quick] [--no-write] [NAME ...]` from the repository root.

Each benchmark is a module here with the same four names:

- `HEADING`: its `## ` heading in BENCHMARKS.md (each benchmark owns exactly one section);
- `run(quick) -> dict`: measure, and return JSON-ready raw results;
- `summary(result) -> list[str]`: the lines printed on stdout;
- `markdown(result) -> str`: the body of its section in BENCHMARKS.md.

The helpers below are shared: where the data is, what machine this is, how busy it is, where a
study's stores go (a temporary folder, never the repository's mlruns/), a Ray session on the
loopback address, and how one section of BENCHMARKS.md is replaced while the others stay as they are.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
OUT_DIR = REPO / "bench" / "out"  # raw results, one JSON file per benchmark (git-ignored)
_TITLE = (
    "# Benchmarks\n\n"
    "Measured with `python -m bench` from the repository root (`--quick` for a smoke run, `--help` for the rest).\n"
    "Each section belongs to one benchmark in `bench/` and is rewritten by it; raw numbers go to `bench/out/`.\n"
)


def use_shared_data() -> None:
    """Point DLSEARCH_DATA_DIR at the shared data folder (../shared/data) unless it is set already."""
    shared = REPO.parent / "shared" / "data"
    if not os.environ.get("DLSEARCH_DATA_DIR") and shared.is_dir():
        os.environ["DLSEARCH_DATA_DIR"] = str(shared)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def versions() -> dict[str, str]:
    """The frameworks a study run goes through."""
    import mlflow
    import optuna
    import ray

    return {"ray": ray.__version__, "optuna": optuna.__version__, "mlflow": mlflow.__version__,
            "torch": torch.__version__}


def load_1min() -> float:
    """The 1-minute load average: above the CPU count, other processes were competing."""
    return os.getloadavg()[0]


def store_overrides(folder: Path) -> list[str]:
    """`--set` items that put every store of a study (MLflow, artifacts, Optuna) in `folder`."""
    return [
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
        f"tracking.artifacts={folder}/artifacts",
        f"tracking.optuna_storage=sqlite:///{folder}/optuna.db",
    ]


@contextlib.contextmanager
def ray_session() -> Iterator[float]:
    """A local Ray on 127.0.0.1 for the block; yields the seconds `ray.init` took, shuts Ray down after.

    `run_study` reuses a Ray that is already running, so a benchmark that starts Ray here keeps
    Ray's start-up out of every timed study alike.
    """
    # The Tune settings `run_study` makes before it starts Ray: set before Ray starts here (the
    # workers inherit the environment then), so that every side runs under them whatever the order.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    import ray

    started = time.perf_counter()
    # address="local": without it, ray.init() joins the cluster named in /tmp/ray/ray_current_cluster
    # (left by any `ray start` on this machine) and waits forever when that cluster is gone.
    ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def warm_up_workers(data: Any, seed: int, n_workers: int) -> float:
    """Untimed: `n_workers` Ray workers import what a trial imports, load the study's data, and exit.

    Without it the first side a benchmark times pays alone for a cold page cache and for Ray's
    first worker start-ups. `max_calls=1` ends each worker after its task, so no side inherits a
    worker that has already imported torch. Returns the seconds it took.
    """
    import ray

    @ray.remote(num_cpus=1, max_calls=1)
    def warm(data: Any, seed: int) -> None:
        import dlsearch.backend.worker  # noqa: F401 - torch, ray.tune and dlsearch, as a trial imports them
        from dlsearch.trial.data import load_data

        load_data(data, seed)

    started = time.perf_counter()
    ray.get([warm.remote(data, seed) for _ in range(n_workers)])
    return time.perf_counter() - started


def write_json(name: str, payload: dict[str, Any]) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def replace_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Put `heading` + `body` in place of the section under `heading` (to the next `## `), or append it.

    Every other section, and anything before the first `## `, is kept byte for byte.
    """
    assert heading.startswith("## "), heading
    text = path.read_text() if path.exists() else _TITLE
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = f"{heading}\n\n{body.strip()}\n"
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + after if after else "")
    path.write_text(text)
