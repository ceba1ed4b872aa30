"""dlsearch's benchmark suite: `python -m bench [--quick] [--no-write] [NAME ...]` from the repository root.

Each benchmark is a module here with the same four names:

- `HEADING`: its `## ` heading in BENCHMARKS.md (each benchmark owns exactly one section);
- `run(quick) -> dict`: measure, and return JSON-ready raw results;
- `summary(result) -> list[str]`: the lines printed on stdout;
- `markdown(result) -> str`: the body of its section in BENCHMARKS.md.

The helpers below are shared: where the data is, what machine this is, and how one section of
BENCHMARKS.md is replaced while the others stay as they are.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

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
