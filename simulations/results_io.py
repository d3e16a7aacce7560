"""Where benchmarks put their results: a JSON file for machines, a markdown table for
people, both stamped with the exact command and the software that produced them."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedq.common.atomic import atomic_write_text

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def results_name(value: str) -> str:
    """An argparse type for a benchmark's results folder: one plain name under
    RESULTS_ROOT, so no ``--results-name`` can write beside or above the other results."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise argparse.ArgumentTypeError(f"letters, digits, - and _ only, got {value!r}")
    return value


def environment() -> dict[str, str]:
    """Versions of the software a result came from, read from the installed packages'
    metadata rather than by importing them: a numpy-only benchmark (the stability sweep)
    must not load torch or flwr, and need not have them installed ("absent")."""
    versions = {}
    for name in ("torch", "flwr", "gymnasium", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {"python": platform.python_version(), **versions, "machine": platform.machine(),
            "cpu": _cpu_model(),
            "openblas-threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset: one per core")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    return "python -m " + _module_name() + " " + shlex.join(sys.argv[1:])


def _module_name() -> str:
    main = Path(sys.argv[0]).resolve()
    try:
        rel = main.relative_to(RESULTS_ROOT.parent.parent)
    except ValueError:
        return str(main)
    # the installed name (fedq.simulations.x): `python -m fedq.simulations.x` works from
    # any directory, the folder's own name only from the checkout's root
    return "fedq." + ".".join(rel.with_suffix("").parts)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:  # a value the run did not measure
            return "-"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """Write ``results/<name>/results.json`` and ``results.md``; returns the folder."""
    folder = RESULTS_ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"command": command_line(), "environment": environment(), **payload}
    atomic_write_text(folder / "results.json", json.dumps(payload, indent=2) + "\n")
    header = f"Command: `{payload['command']}`\n\nEnvironment: {payload['environment']}\n\n"
    atomic_write_text(folder / "results.md", header + markdown + "\n")
    return folder


SOLVED_CONSECUTIVE = 3  # evaluations in a row at the goal that count as "solved"


def solved_at(curve: Sequence[tuple[float, float]], goal: float,
              consecutive: int = SOLVED_CONSECUTIVE) -> float | None:
    """The env steps at which a learning curve counts as solved: the step of the
    ``consecutive``-th evaluation in a row whose mean greedy return reaches ``goal``
    (None if it never does). One lucky evaluation is not a solved task: DQN policies
    often touch the goal once and collapse, so every fedq benchmark uses this rule and
    also reports the final and the best return."""
    run = 0
    for steps, value in curve:
        run = run + 1 if value >= goal else 0
        if run >= consecutive:
            return steps
    return None


def curve_summary(curve: Sequence[tuple[float, float]], goal: float) -> dict[str, Any]:
    """What every learning benchmark reports of one curve: when it was solved (3 in a
    row), its final and its best return."""
    return {"solved-at": solved_at(curve, goal), "final-return": curve[-1][1] if curve else None,
            "best-return": max(value for _, value in curve) if curve else None}


def spread(values: Sequence[float]) -> str:
    """``median [min, max]`` of a few seeds' values, for tables."""
    if not values:
        return "-"
    return f"{statistics.median(values):,.1f} [{min(values):,.1f}, {max(values):,.1f}]"
