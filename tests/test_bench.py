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
    assert "dlsearch_population: wall" in out and "dlsearch with populations/peer" in out, out
    assert "tracking:" in out and "of in-trial time" in out and "log_batch" in out, out
    assert "wrote " not in out, "--no-write must leave BENCHMARKS.md and bench/out/ alone"


def test_quick_loop_pruning_and_population_benchmarks_run_and_print_their_figures() -> None:
    # overhead, tracking, sampler and memory have tests of their own in this file.
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-write", "loop", "pruning", "population"],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ratio dlsearch/bare" in proc.stdout  # no speed assertion: a shared CI machine is noisy
    out = proc.stdout
    assert "fewer epochs" in out and "speedup" in out, out
    assert "wrote " not in proc.stdout


def test_quick_sampler_and_memory_benchmarks_record_sane_figures() -> None:
    from bench import __main__ as cli
    from bench import memory, sampler, use_shared_data

    assert cli.SUITE["sampler"] is sampler and cli.SUITE["memory"] is memory
    use_shared_data()

    result = sampler.run(quick=True)
    plan = sampler.plan(quick=True)
    assert {(g["sampler"], g["storage"]) for g in result["growths"]} == {
        (s, st) for s in sampler.SAMPLERS for st in sampler.STORAGES}
    for g in result["growths"]:
        assert len(g["ask_ms"]) == len(g["tell_ms"]) == plan.n_trials
        assert [a["n"] for a in g["at"]] == list(plan.points), "an ask time at each trial count"
        for a in g["at"]:
            lo, hi = a["window"]
            assert 0 <= lo <= hi < plan.n_trials
            assert 0 < a["ask_ms_min"] <= a["ask_ms"] < 60_000 and 0 < a["tell_ms"] < 60_000, a
        assert 0.0 <= g["mean_value_first"] <= 1.0 and 0.0 <= g["best_value"] <= 1.0
        # An ask creates a trial and sets every parameter: on SQLite, a transaction each.
        assert (g["commits_per_ask"] >= 6) if g["storage"] == "sqlite" else (g["commits_per_ask"] == 0), g
    assert all(r > 0 for r in result["tpe_over_random"].values())
    text = sampler.markdown(result)
    assert "| tpe | sqlite |" in text and "| random | memory |" in text and "TPE / random" in text, text
    assert sampler.summary(result)

    result = memory.run(quick=True)
    (case,) = result["cases"]
    n_samples = 0
    for side in memory.SIDES:
        s = case["sides"][side]
        phases = [s[phase] for phase in ("imports", "data_loaded", "trained")]
        assert all(0 < p["now_mib"] <= p["peak_mib"] < 64 * 1024 for p in phases), s
        assert s["peak_mib"] == max(p["peak_mib"] for p in phases), s
        # Each phase's peak starts from the RSS the phase before it ended with (1 MiB of slack for pages freed between).
        assert phases[1]["peak_mib"] >= phases[0]["now_mib"] - 1 and phases[2]["peak_mib"] >= phases[1]["now_mib"] - 1, s
        n_samples = sum(int(part.split()[0]) for part in s["data"].split(" / "))  # "N train / N val / N test"
        assert s["data_bytes"] == n_samples * (28 * 28 * 4 + 8), s  # float32 images, int64 labels
        assert (s["cuda_max_allocated"] is None) == (s["device"] == "cpu"), s
    assert n_samples == 12_000  # data.subset=2000 (train + val) and the 10,000 test images
    assert case["peak_ratio"] > 0
    text = memory.markdown(result)
    assert "| MNIST MLP (quick) | bare |" in text and "| MNIST MLP (quick) | dlsearch |" in text, text
    assert memory.summary(result)


def test_quick_versus_benchmark_times_dlsearch_run_beside_the_plain_optuna_script() -> None:
    import re

    from bench import versus

    # The driver's own CPU time is read from /proc after it exited, before it is reaped.
    busy = versus.timed_process(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"],
        REPO, versus._env())
    assert 0.25 <= busy["driver_cpu_s"] <= busy["wall_s"] + 0.05 and busy["driver_cpu_s"] <= busy["tree_cpu_s"] + 0.05

    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-write", "versus"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    # 3 trials x at most 2 epochs on each side, each a whole process timed from start to exit.
    for side in ("dlsearch", "optuna"):
        found = re.search(rf"^  {side}: wall ([\d.]+) s, 3 trials, (\d+) epochs trained, best (0\.\d+)", out, re.MULTILINE)
        assert found, out
        assert float(found.group(1)) > 0 and 3 <= int(found.group(2)) <= 6, out
    assert re.search(r"quickstart dlsearch/plain [\d.]+x against optuna", out), out
    assert "wrote " not in out


@pytest.mark.timeout(1500)
@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "mnist").is_dir(), reason="MNIST is read from ../shared/data")
def test_gpu_benchmark_dry_run_runs_every_case_through_dlsearch_run_on_the_cpu_and_writes_nothing() -> None:
    import re

    from bench import __main__ as cli
    from bench import gpu

    assert cli.SUITE["gpu"] is gpu and "gpu" in cli.ONLY_WHEN_NAMED  # a plain `python -m bench` leaves it out
    raw = REPO / "bench" / "out" / "gpu.json"

    def gpu_section() -> str:  # the only section `python -m bench gpu` writes (others may change meanwhile)
        text = (REPO / "BENCHMARKS.md").read_text()
        start = text.index(gpu.HEADING)
        end = text.find("\n## ", start + len(gpu.HEADING))
        return text[start:end if end >= 0 else len(text)]

    before = (gpu_section(), raw.stat().st_mtime if raw.exists() else None)

    proc = subprocess.run(
        [sys.executable, "-m", "bench", "gpu", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=1400, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "DRY RUN on the CPU" in out, out
    # Every case ran as its own `dlsearch run` and finished its tiny budget, with a trials/min figure.
    for case in gpu.CASES:
        found = re.search(rf"^  {case.key}: {re.escape(case.label)}: wall ([\d.]+) s, (\d+) trials finished "
                          rf"\(budget (\d+)\), ([\d.]+) trials/min, ([\d.]+)x one trial per GPU; .*"
                          rf"best val_accuracy (0\.\d+|1\.0+)", out, re.MULTILINE)
        assert found, (case.key, out)
        assert float(found.group(1)) > 0 and int(found.group(2)) == int(found.group(3)) == case.dry_trials, out
        assert float(found.group(4)) > 0 and float(found.group(5)) > 0, out
    assert re.search(r"goals: shared >= 10x one trial per GPU: [\d.]+x \([248] trials share the GPU\), dry run: not "
                     r"judged; populations >= 50x: [\d.]+x \(population K=(16|64|256)\), dry run: not judged", out), out
    # The sampler is seeded and asks in order: trial n has the same parameters in every case.
    found = re.search(r"same trials in every case: (\d+) trial numbers finished everywhere, "
                      r"with the same parameters in every case: yes", out)
    assert found and int(found.group(1)) == min(c.dry_trials for c in gpu.CASES), out

    # Nothing written but a temporary file with the section, marked dry run, one row per case.
    assert "wrote " not in out
    assert (gpu_section(), raw.stat().st_mtime if raw.exists() else None) == before
    found = re.search(r"the section it would write \(marked dry run\) is in (\S+\.md)", out)
    assert found, out
    section = Path(found.group(1)).read_text()
    assert section.startswith(gpu.HEADING) and "**DRY RUN on the CPU**" in section, section
    assert all(f"| {case.label} | gpus_per_trial 0, max_concurrent {case.max_concurrent}" in section
               for case in gpu.CASES), section
