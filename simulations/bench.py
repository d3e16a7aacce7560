"""Run fedq's benchmarks: ``python -m fedq.simulations.bench <name>|all|list``.

Every benchmark is declared on :mod:`simulations.harness` and runs here cell by cell, with
the harness's cache, seeds, results and plots. ``python -m fedq.simulations.bench all`` is
the one command that regenerates every committed result under ``simulations/results/``
(about a day on a 2-core machine, an estimate: ``docs/benchmarks.md`` lists each part;
the Docker-level ``compose``, ``compose_pi1g`` and ``pi`` need root or a running engine).

    python -m fedq.simulations.bench list
    python -m fedq.simulations.bench robustness --set seeds=2 --workers 2
    python -m fedq.simulations.bench all --quick      # every benchmark, tiny cells
    python -m fedq.simulations.bench privacy_sweep --report   # tabulate what is cached

Run as a command, it gives numpy's OpenBLAS one thread unless ``OPENBLAS_NUM_THREADS`` is
already set (the results record it): a cell's matrices are small, and with ``--workers 2``
on 2 cores each worker's OpenBLAS pool of 2 spinning threads made numpy-backend cells
(LunarLander-v3 learning runs) about 5x slower than one thread each (beside two busy
cells, a 128x256 @ 256x256 product and its transpose pair took 1.06 ms with OpenBLAS's
default threads, 0.53 ms with one). It must be set before
numpy is imported, hence here, before any fedq import, and only when run as ``__main__``
(importing this module, as the tests do, leaves the process's environment alone).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The imports below come after the OpenBLAS setting: fedq.common.config imports numpy.
import argparse
import importlib
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from fedq.common.config import parse_assignment
from fedq.simulations.harness import BENCHMARKS, HarnessError, run_benchmark, staleness

BENCHMARK_MODULES = ("bench_dp_cost", "bench_speed", "bench_backend", "bench_export",
          "bench_robustness", "bench_communication", "privacy_sweep", "bench_scale",
          "privacy_gain", "bench_learning", "bench_federation",
          "bench_federation_levers", "bench_federation_pays", "bench_carracing_speed",
          "bench_federation_n4", "privacy_pretrain", "privacy_pretrain_device", "bench_cnn",
          "bench_secagg", "bench_deployment", "bench_stability",
          "bench_fault_drill", "bench_carracing", "bench_docker", "bench_resume_wait")
"""Modules whose import registers their harness benchmarks."""


def load_benchmarks() -> None:
    """Import the benchmark modules (each registers itself)."""
    for module in BENCHMARK_MODULES:
        importlib.import_module(f"fedq.simulations.{module}")


def _command(name: str, args: argparse.Namespace) -> str:
    """The command this run amounts to for one benchmark, every flag that was in effect
    spelt out (``--workers`` too, even at its default), so a result file says exactly how
    it was made; under ``all`` it is that benchmark's share of the run."""
    flags = [name] + [flag for flag, on in (("--quick", args.quick), ("--fresh", args.fresh),
                                            ("--report", args.report)) if on] + \
        ["--workers", str(args.workers)] + [f"--set={item}" for item in args.overrides] + \
        (["--results-root", str(args.results_root)] if args.results_root else [])
    return "python -m fedq.simulations.bench " + shlex.join(flags)


def main(argv: Sequence[str] | None = None) -> int:
    load_benchmarks()
    parser = argparse.ArgumentParser(prog="python -m fedq.simulations.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a benchmark, 'all', 'list', or 'stale' (which "
                        "committed results today's code would not reproduce)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny cells; results under runs/harness/quick/")
    parser.add_argument("--fresh", action="store_true",
                        help="run every cell again instead of reusing the cache")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the results of the cells already cached")
    parser.add_argument("--workers", type=int, default=1,
                        help="cells run at once (benchmarks that time things: always 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PARAM=VALUE", help="a benchmark parameter (TOML scalar)")
    parser.add_argument("--results-root", type=Path, default=None, metavar="DIR",
                        help="write results to DIR/<name>/ instead of the committed "
                             "simulations/results/ (a trial run that must not overwrite them)")
    args = parser.parse_args(argv)
    if args.name == "stale":
        for b in BENCHMARKS.values():
            print(f"{b.name:30} {staleness(b)}")
        return 0
    if args.name == "list":
        for b in BENCHMARKS.values():
            print(f"{b.name:30} {b.doc}\n{'':31}parameters: {dict(b.defaults)}")
        return 0
    known = list(BENCHMARKS)
    if args.name != "all" and args.name not in known:
        parser.error(f"unknown benchmark {args.name!r}; one of: all, list, stale, "
                     f"{', '.join(known)}")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.overrides and args.name == "all":
        parser.error("--set applies to one benchmark, not to all")
    try:
        overrides = dict(parse_assignment(item) for item in args.overrides)
    except ValueError as err:
        parser.error(str(err))
    names = known if args.name == "all" else [args.name]
    failed = []
    for name in names:
        try:
            run_benchmark(BENCHMARKS[name], overrides=overrides, quick=args.quick,
                          fresh=args.fresh, report=args.report, workers=args.workers,
                          command=_command(name, args), results_root=args.results_root)
        except (HarnessError, ValueError) as err:
            if args.name != "all":
                print(f"python -m fedq.simulations.bench: {err}", file=sys.stderr)
                return 2
            print(f"[bench] {name}: failed: {err}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
