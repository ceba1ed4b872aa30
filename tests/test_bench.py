"""Smoke test of the benchmark suite (bench/): the quick variants run end to end and print figures.

No speed is asserted: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_overhead_and_tracking_benchmarks_run_and_print_their_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-write", "overhead", "tracking"],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "overhead:" in out and "s/trial" in out and "dlsearch/peer" in out, out
    assert "tracking:" in out and "of in-trial time" in out and "log_batch" in out, out
    assert "wrote " not in out, "--no-write must leave BENCHMARKS.md and bench/out/ alone"
