"""Run fedq's benchmarks: ``python -m fedq.simulations.bench <name>|all|list``.

Benchmarks ported onto :mod:`simulations.harness` run here cell by cell, with the
harness's cache, seeds, results and plots. The others are still their own scripts
(:data:`SCRIPTS`): ``all`` runs each by the command that produced its committed results.
``python -m fedq.simulations.bench all`` is the one command that regenerates every
committed result under ``simulations/results/`` (about a day on a 2-core machine, an
estimate: ``docs/benchmarks.md`` lists each part).

    python -m fedq.simulations.bench list
    python -m fedq.simulations.bench robustness --set seeds=2 --workers 2
    python -m fedq.simulations.bench all --quick      # every ported benchmark, tiny cells
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
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedq.common.config import parse_assignment
from fedq.simulations.harness import BENCHMARKS, HarnessError, run_benchmark, staleness

PORTED = ("bench_dp_cost", "bench_speed", "bench_backend", "bench_export",
          "bench_robustness", "bench_communication", "privacy_sweep", "bench_scale",
          "privacy_gain", "bench_learning", "bench_federation",
          "bench_federation_levers", "bench_federation_pays", "bench_carracing_speed",
          "bench_federation_n4", "privacy_pretrain", "privacy_pretrain_device", "bench_cnn",
          "bench_secagg", "bench_deployment", "bench_stability",
          "bench_fault_drill", "bench_carracing")
"""Modules whose import registers their harness benchmarks."""


@dataclass(frozen=True)
class Script:
    """A benchmark not (yet) on the harness: the commands that regenerate its committed
    results, run from the repository root, and an estimate of the hours they take here."""

    name: str
    commands: tuple[str, ...]
    hours: float
    why: str


SCRIPTS = (
    Script("compose", (
        "python -m fedq.simulations.compose_check --out "
        "simulations/results/compose/compose_check.json",
        "python -m fedq.simulations.compose_check --skip-faults --pi-memory 1g --out "
        "simulations/results/compose/compose_check_pi1g.json"), 0.2,
        "process-level: needs a Docker engine"),
    Script("pi", ("python -m fedq.simulations.pi_emulation --backends numpy,torch --rounds 5 "
                  "--local-steps 2000",), 0.4,
           "one SuperNode under Docker's --cpus 1 --memory 512m; needs a Docker engine"),
)


def load_benchmarks() -> None:
    """Import the ported benchmark modules (each registers itself)."""
    for module in PORTED:
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


def _run_script(script: Script, report: bool) -> bool:
    """Run a script benchmark's commands; False if one failed."""
    if report:
        print(f"[bench] {script.name}: a script benchmark, nothing cached to report")
        return True
    ok = True
    for command in script.commands:
        print(f"[bench] {script.name}: {command}", flush=True)
        argv = shlex.split(command.replace("python ", f"{shlex.quote(sys.executable)} ", 1))
        started = time.perf_counter()
        code = subprocess.call(argv)
        print(f"[bench] {script.name}: exit {code} after {time.perf_counter() - started:.0f} s",
              flush=True)
        ok = ok and code == 0
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    load_benchmarks()
    scripts = {s.name: s for s in SCRIPTS}
    parser = argparse.ArgumentParser(prog="python -m fedq.simulations.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a benchmark, 'all', 'list', or 'stale' (which "
                        "committed results today's code would not reproduce)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny cells; results under runs/harness/quick/ (scripts skipped)")
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
        for script in SCRIPTS:
            print(f"{script.name:30} script: not tracked (run its commands to regenerate)")
        return 0
    if args.name == "list":
        for b in BENCHMARKS.values():
            print(f"{b.name:20} harness  {b.doc}\n{'':29}parameters: {dict(b.defaults)}")
        for s in SCRIPTS:
            print(f"{s.name:20} script   ~{s.hours:g} h (estimate), {len(s.commands)} command(s) "
                  f"({s.why})")
        return 0
    known = [*BENCHMARKS, *scripts]
    if args.name != "all" and args.name not in known:
        parser.error(f"unknown benchmark {args.name!r}; one of: all, list, stale, "
                     f"{', '.join(known)}")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.results_root and args.name in scripts:
        parser.error(f"--results-root: {args.name} is a script benchmark and writes its own "
                     "results (its commands say where)")
    if args.overrides and args.name == "all":
        parser.error("--set applies to one benchmark, not to all")
    try:
        overrides = dict(parse_assignment(item) for item in args.overrides)
    except ValueError as err:
        parser.error(str(err))
    names = known if args.name == "all" else [args.name]
    failed = []
    for name in names:
        if name in scripts:
            if args.quick or args.results_root:
                print(f"[bench] {name}: script benchmark, no --quick variant or --results-root:"
                      " skipped")
            elif not _run_script(scripts[name], args.report):
                failed.append(name)
            continue
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
