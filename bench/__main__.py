"""`python -m bench [--quick] [--no-write] [NAME ...]`: run dlsearch's benchmarks.

Prints each benchmark's summary, replaces its section of BENCHMARKS.md and writes its raw
results to bench/out/NAME.json (neither with --no-write). `gpu` needs a GPU and runs only when
named: `python -m bench gpu`; `python -m bench gpu --dry-run` runs its cases on the CPU with tiny
budgets and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

from bench import (
    BENCHMARKS_MD,
    gpu,
    lcbench,
    loop,
    memory,
    overhead,
    population,
    population_run,
    pruning,
    replace_section,
    sampler,
    tracking,
    use_shared_data,
    versus,
    write_json,
)

SUITE = {"loop": loop, "overhead": overhead, "pruning": pruning, "tracking": tracking, "sampler": sampler,
         "memory": memory, "population": population, "population_run": population_run, "versus": versus, "lcbench": lcbench, "gpu": gpu}
ONLY_WHEN_NAMED = ("gpu",)  # needs a GPU: not part of a plain `python -m bench`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default all but {', '.join(ONLY_WHEN_NAMED)}: "
                             f"{', '.join(n for n in SUITE if n not in ONLY_WHEN_NAMED)})")
    parser.add_argument("--quick", action="store_true", help="a small smoke run: little data, one epoch")
    parser.add_argument("--no-write", action="store_true",
                        help="print only: leave BENCHMARKS.md and bench/out/ untouched")
    parser.add_argument("--dry-run", action="store_true",
                        help="gpu only: its cases on the CPU with tiny budgets (resources.gpus_per_trial=0), to "
                             "prove the command end to end; writes nothing to BENCHMARKS.md or bench/out/")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; the suite has {', '.join(SUITE)}")
    if args.dry_run:
        if args.names != ["gpu"]:
            parser.error("--dry-run is the gpu benchmark's: python -m bench gpu --dry-run")
        args.quick = args.no_write = True
    use_shared_data()
    for name in args.names or [n for n in SUITE if n not in ONLY_WHEN_NAMED]:
        bench = SUITE[name]
        result = bench.run(quick=args.quick)
        for line in bench.summary(result):
            print(line, flush=True)
        if not args.no_write and not result.get("dry_run"):  # `--quick gpu` is the dry run: no rows from it
            path = write_json(name, result)
            replace_section(bench.HEADING, bench.markdown(result))
            print(f"wrote {path.relative_to(path.parents[2])} and the {bench.HEADING[3:]!r} section of "
                  f"{BENCHMARKS_MD.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
