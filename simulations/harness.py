"""One runner for every benchmark: declared cells, a resumable cache, stamped results.

A benchmark (:class:`Benchmark`) declares its parameters (the defaults that produced its
committed results, and a tiny ``quick`` variant), the cells those parameters expand to
(:class:`Cell`: a kind of unit of work and its parameters, e.g. one federated run of one
seed), and how finished cells become a table, a plot and a JSON payload. The runner
(:func:`run_benchmark`) does everything else, the same way for every benchmark:

- **cache**: each finished cell is one JSON file ``runs/harness/<kind>/<fingerprint>.json``.
  The fingerprint hashes the cell's kind, its parameters and the source of the code it
  declares (by default fedq's product packages), so a code or parameter change runs the
  cell again and anything else reuses it. Two benchmarks that need the same cell (the
  clean FedAvg run of ``robustness`` and ``communication``) share it.
- **resume**: a cell's scratch folder (``<fingerprint>.work/``) is wiped before it starts;
  the cell's JSON is written atomically only when it finished, so a killed benchmark
  continues with its unfinished cells when the same command runs again.
- **results**: ``results.json`` (parameters, every cell's fingerprint, the summary),
  ``results.md`` (the table) and a plot, in ``simulations/results/<name>/``, each stamped
  with the exact command and the environment (Python, torch, flwr, CPU).

``--quick`` runs the benchmark's tiny variant and writes its results under
``runs/harness/quick/<name>/``, never over the committed ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedq.common.atomic import atomic_write_text
from fedq.simulations.results_io import RESULTS_ROOT, environment, markdown_table

CACHE_ROOT = Path("runs") / "harness"
PRODUCT_CODE = ("fedq.common", "fedq.client", "fedq.server")
"""What a cell's result depends on unless its kind says otherwise: fedq's product code,
less :data:`DEPLOYMENT_ONLY`."""
DEPLOYMENT_ONLY = ("fedq.client.supernode", "fedq.client.warm_executor",
                   "fedq.client.clientapp_launcher", "fedq.client.handoff",
                   "fedq.client.env_settings", "fedq.client.edge", "fedq.server.submit")
"""Product modules that only a deployed device or server runs: ``fedq-supernode`` with its
warm executor, ClientApp launcher and hand-offs, ``fedq-client``, ``fedq-submit``. Flower's
simulation engine and the in-process learners never import them (tests/test_harness.py
follows the imports), so a kind's code hashes them only when it names :data:`DEPLOYS`:
a fix to how a device runs its ClientApps reruns the benchmarks that deploy, not every
simulation."""
DEPLOYS = "fedq.simulations.compose_topology"
"""The module that starts the compose file's topology (``fedq-supernode``s, ``fedq-submit``),
locally or in Docker: a kind whose code names it hashes :data:`DEPLOYMENT_ONLY` too."""

Params = Mapping[str, Any]


class HarnessError(RuntimeError):
    """A benchmark cannot run or report as asked (the message says why)."""


@dataclass(frozen=True)
class CellKind:
    """A kind of unit of work: ``run(params, workdir)`` does one and returns a JSON-ready
    result. ``code``: the modules (a package: every ``.py`` beneath it) whose source the
    result depends on, hashed into each cell's fingerprint."""

    name: str
    run: Callable[[Params, Path], dict[str, Any]]
    code: tuple[str, ...] = PRODUCT_CODE


@dataclass(frozen=True)
class Cell:
    """One unit of a benchmark: which kind, with which (JSON-ready) parameters."""

    kind: CellKind
    params: Params


@dataclass
class Summary:
    """What a benchmark makes of its finished cells: table rows and columns, text under
    the table, extra JSON, and a plot drawn into the given path (None: no plot)."""

    rows: list[dict[str, Any]]
    columns: list[str]
    text: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    plot: Callable[[Path], None] | None = None


Done = list[tuple[Cell, dict[str, Any]]]
"""Each finished cell with its result, in the order the benchmark declared them."""


def cell_key(cell: Cell) -> str:
    """A cell's identity without its code: kind and parameters (for looking a declared
    cell up among the finished ones)."""
    return json.dumps({"kind": cell.kind.name, "params": cell.params}, sort_keys=True)


def results_by_cell(done: Done) -> dict[str, dict[str, Any]]:
    """The finished cells' results by :func:`cell_key`."""
    return {cell_key(cell): result for cell, result in done}


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its parameters and how they expand to cells and summarise.

    ``defaults``: the parameters of the committed results; ``quick``: overrides giving a
    run of seconds to a minute (tests and smoke runs). ``parallel``: its cells may run in
    separate worker processes at once (False for timing benchmarks, whose cells must not
    share the CPU)."""

    name: str
    doc: str
    defaults: Params
    quick: Params
    cells: Callable[[Params], list[Cell]]
    summarise: Callable[[Params, Done], Summary]
    parallel: bool = True
    plot_name: str = "plot.png"


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add ``benchmark`` to the registry ``python -m fedq.simulations.bench`` runs."""
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    unknown = set(benchmark.quick) - set(benchmark.defaults)
    if unknown:
        raise ValueError(f"benchmark {benchmark.name!r}: quick sets unknown parameters "
                         f"{sorted(unknown)}")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


@contextmanager
def one_core() -> Iterator[None]:
    """Pin this process to one core (the lowest it may use) and one torch thread while a
    timing cell runs, as ``taskset -c 0`` did for the timing scripts; restored after."""
    import torch

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def _source(name: str) -> tuple[Path, list[Path]]:
    """(root, .py files) of module or package ``name``, the files by path."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise HarnessError(f"code module {name!r} not found")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        return root, sorted(root.rglob("*.py"))
    return Path(spec.origin).parent, [Path(spec.origin)]


def hashed_files(modules: Sequence[str]) -> list[tuple[str, Path]]:
    """(label, file) of each source ``modules`` stands for: packages give every ``.py``
    beneath, by path, except the :data:`DEPLOYMENT_ONLY` modules unless ``modules`` names
    :data:`DEPLOYS`."""
    left_out = set() if DEPLOYS in modules else {
        path for m in DEPLOYMENT_ONLY for path in _source(m)[1]}
    out = []
    for name in modules:
        root, files = _source(name)
        out += [(f"{name}/{path.relative_to(root).as_posix()}", path) for path in files
                if path not in left_out]
    return out


def code_hash(modules: Sequence[str]) -> str:
    """sha256 of the source of ``modules`` (:func:`hashed_files`)."""
    digest = hashlib.sha256()
    for label, path in hashed_files(modules):
        digest.update(f"{label}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(cell: Cell, code_hashes: dict[tuple[str, ...], str] | None = None) -> str:
    """The cell's cache key: its kind, parameters and code (16 hex digits)."""
    hashes = {} if code_hashes is None else code_hashes
    if cell.kind.code not in hashes:
        hashes[cell.kind.code] = code_hash(cell.kind.code)
    text = json.dumps({"kind": cell.kind.name, "params": cell.params,
                       "code": hashes[cell.kind.code]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def staleness(benchmark: Benchmark, results_root: Path = RESULTS_ROOT) -> str:
    """Whether ``benchmark``'s committed results are what today's code would produce.

    Each results file records its parameters and every cell's fingerprint (kind,
    parameters, source of the code the kind declares); a cell whose fingerprint today's
    code no longer gives was made by other code. ``current`` means every cell matches,
    so a rerun would only reuse the cache; anything else says how many cells a rerun
    would run again."""
    path = results_root / benchmark.name / "results.json"
    if not path.exists():
        return "no committed results"
    record = json.loads(path.read_text())
    if "params" not in record or "cells" not in record:
        return "stale: written before the harness recorded parameters and cell fingerprints"
    try:
        cells = benchmark.cells({**benchmark.defaults, **record["params"]})
    except (KeyError, TypeError, ValueError) as err:
        return f"stale: its parameters predate the benchmark's ({type(err).__name__}: {err})"
    hashes: dict[tuple[str, ...], str] = {}
    recorded = {c["fingerprint"] for c in record["cells"]}
    unique = {fingerprint(c, hashes) for c in cells}
    changed = len(unique - recorded)
    partial = f", {record['missing-cells']} never ran" if record.get("missing-cells") else ""
    if not changed:
        return f"current ({len(unique)} cells{partial})"
    return f"stale: {changed} of {len(unique)} cells ran on other code{partial}"


def workdir_of(cell: Cell, beside: Path) -> Path:
    """The kept scratch folder of a finished ``cell`` in the cache that holds ``beside``
    (the asking cell's own workdir): how a cell reads an earlier cell's files, e.g. a
    measurement the policy a training cell left. The benchmark declares ``cell`` before
    the one asking, so it has run (benchmarks with such cells are not ``parallel``)."""
    path = beside.parent.parent / cell.kind.name / f"{fingerprint(cell)}.json"
    if not path.exists():
        raise HarnessError(f"cell {cell_key(cell)} has not finished: declare it before the "
                           "cells that read it")
    return path.with_suffix(".work")


def name_list(params: Params, key: str, known: Sequence[str], *,
              everything: str | None = None) -> list[str]:
    """The comma-separated names of parameter ``key``, each one of ``known`` (or the word
    ``everything``, e.g. ``"all"``: every known name). One parser for every benchmark's
    list parameters, so ``--set envs=CartPol-v1`` fails at once, naming the parameter
    and what it may hold, instead of hours later or not at all."""
    text = str(params[key])
    if everything is not None and text.strip() == everything:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        choices = ", ".join(known) + (f" (or {everything!r} for all)" if everything else "")
        raise HarnessError(f"{key}: unknown {unknown or text!r}; known: {choices}")
    return names


def resolve_params(benchmark: Benchmark, overrides: Params, quick: bool) -> dict[str, Any]:
    """The defaults, then the quick variant, then ``overrides``; unknown names refused."""
    unknown = sorted(set(overrides) - set(benchmark.defaults))
    if unknown:
        raise HarnessError(f"benchmark {benchmark.name!r} has no parameter "
                           f"{', '.join(map(repr, unknown))} (it has: "
                           f"{', '.join(benchmark.defaults)})")
    return {**benchmark.defaults, **(benchmark.quick if quick else {}), **overrides}


def _run_one(kind: CellKind, params: Params, path: Path) -> dict[str, Any]:
    """Run one cell in a fresh scratch folder and write its JSON; returns the record."""
    workdir = path.with_suffix(".work")
    if workdir.exists():  # left by a killed run: start the cell again from scratch
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    result = kind.run(params, workdir)
    record = {"kind": kind.name, "params": dict(params), "seconds":
              time.perf_counter() - started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "result": result}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")  # NaN kept: the cache is ours
    return record


@dataclass
class RunReport:
    """What :func:`run_benchmark` did: cells run and reused, and where results went."""

    ran: int
    cached: int
    missing: int
    folder: Path | None


def run_benchmark(benchmark: Benchmark, *, overrides: Params | None = None,
                  quick: bool = False, fresh: bool = False, report: bool = False,
                  workers: int = 1, command: str = "", cache_root: Path = CACHE_ROOT,
                  results_root: Path | None = None,
                  log: Callable[[str], None] = print) -> RunReport:
    """Run (or reuse) every cell of ``benchmark`` and write its results.

    ``fresh``: run every cell again, overwriting its cache entry; ``report``: run
    nothing, summarise the cached cells (no results written if none is). Results go to
    ``results_root/<name>/`` (default: the committed ``simulations/results/``; with
    ``quick``: ``cache_root/quick/``)."""
    params = resolve_params(benchmark, overrides or {}, quick)
    cells = benchmark.cells(params)
    hashes: dict[tuple[str, ...], str] = {}
    paths = [cache_root / c.kind.name / f"{fingerprint(c, hashes)}.json" for c in cells]
    records: dict[int, dict[str, Any]] = {}
    todo, first = [], {}
    for i, path in enumerate(paths):
        if path in first:  # declared twice: run once, reported as each
            continue
        first[path] = i
        if path.exists() and not fresh:
            records[i] = json.loads(path.read_text())
        elif not report:
            todo.append(i)
    cached = len(records)
    log(f"[bench] {benchmark.name}: {len(cells)} cells, {cached} cached, {len(todo)} to run")
    if workers > 1 and benchmark.parallel and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {i: pool.submit(_run_one, cells[i].kind, cells[i].params, paths[i])
                       for i in todo}
            for i, future in futures.items():
                records[i] = future.result()
                log(f"[bench] {benchmark.name}: cell {i + 1}/{len(cells)} done in "
                    f"{records[i]['seconds']:.1f} s")
    else:
        for i in todo:
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            records[i] = _run_one(cells[i].kind, cells[i].params, paths[i])
            log(f"[bench] {benchmark.name}: cell {i + 1}/{len(cells)} done in "
                f"{records[i]['seconds']:.1f} s")
    for i, path in enumerate(paths):
        if first[path] in records:
            records[i] = records[first[path]]
    missing = len(cells) - len(records)
    if not records:
        log(f"[bench] {benchmark.name}: no cell finished, nothing to report")
        return RunReport(len(todo), cached, missing, None)
    done = [(cells[i], records[i]["result"]) for i in sorted(records)]
    summary = benchmark.summarise(params, done)
    root = results_root or (cache_root / "quick" if quick else RESULTS_ROOT)
    folder = write_benchmark_results(
        root / benchmark.name, benchmark, params, summary, command=command,
        cells=[{"kind": cells[i].kind.name, "params": dict(cells[i].params),
                "fingerprint": paths[i].stem, "seconds": records[i]["seconds"]}
               for i in sorted(records)],
        missing=missing)
    log(markdown_table(summary.rows, summary.columns))
    log(f"[bench] {benchmark.name}: results in {folder}")
    return RunReport(len(todo), cached, missing, folder)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as None: strict JSON has no NaN or Infinity
    (a benchmark's NaN is a value the run could not measure, its inf "no guarantee")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_benchmark_results(folder: Path, benchmark: Benchmark, params: Params,
                            summary: Summary, *, command: str, cells: list[dict[str, Any]],
                            missing: int) -> Path:
    """``results.json``, ``results.md`` and the plot of one benchmark, stamped with the
    command and the environment."""
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    partial = (f"**Partial: {missing} cell(s) not run yet** (`--report` of an unfinished "
               "benchmark).\n\n" if missing else "")
    plot = ""
    if summary.plot is not None:
        summary.plot(folder / benchmark.plot_name)
        plot = f"\n\n![{benchmark.name}]({benchmark.plot_name})"
    payload = {"benchmark": benchmark.name, "command": command, "environment": env,
               "params": dict(params), "summary": summary.rows, **summary.payload,
               "cells": cells, "missing-cells": missing}
    atomic_write_text(folder / "results.json",
                      json.dumps(strict_json(payload), indent=2, allow_nan=False) + "\n")
    text = f"\n\n{summary.text}" if summary.text else ""
    atomic_write_text(folder / "results.md",
                      f"# {benchmark.name}: {benchmark.doc}\n\nCommand: `{command}`\n\n"
                      f"Environment: {env}\n\n{partial}"
                      f"{markdown_table(summary.rows, summary.columns)}{text}{plot}\n")
    return folder
