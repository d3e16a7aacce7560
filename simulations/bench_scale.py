"""Scale in simulation: 100 virtual devices, 10 sampled per round, on one small machine.

Runs the heterogeneous CartPole scenario through Flower's simulation engine twice with
the same work per round (10 devices train and 10 evaluate): once with 10 virtual devices
(fraction 1.0) and once with 100 (fraction-train = fraction-evaluate = 0.1). While each
runs, a sampler thread sums the memory of every process this benchmark started
(SuperLink, simulation runtime, Ray's workers and actors), RSS and PSS (shared pages
split between the processes sharing them, so PSS does not count torch's libraries once
per actor). The memory one more virtual device costs is the difference of the two runs'
peaks over the 90 extra devices, plus what it keeps on disk (its replay buffer and
learner state under ``devices/``).

Why so little: a virtual device is not a process. The engine runs ``--cpus-per-client``
sized Ray actors (here one core each, so two on two cores) and hands them whichever
sampled device's message comes next; between rounds a device exists only as its
partition id and its files on disk.

    python -m fedq.simulations.bench scale

Each run is one ``scale-run`` cell of :mod:`simulations.harness` (cached under
``runs/harness/``; the two run one at a time, as each measures the machine's memory).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    Summary,
    register_benchmark,
)
from fedq.simulations.run import app_defaults, resolve_run_config, simulate
from fedq.simulations.scenario import SCENARIOS_DIR, load_scenario


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """Summed (RSS, PSS) in KiB of the processes still alive."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


class PeakSampler(threading.Thread):
    """Peak summed memory of this process's descendants, sampled every ``period`` s."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0

    def run(self) -> None:
        while not self.stop.wait(self.period):
            pids = descendants(os.getpid())
            rss, pss = memory_kib(pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))


def du_kib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024


def run_one(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One ``scale-run`` cell: the scenario with ``clients`` virtual devices, a share
    ``fraction`` of them sampled per round, its peak memory sampled while it runs."""
    clients, fraction = params["clients"], params["fraction"]
    run_dir = workdir.resolve()
    overrides = {"num-server-rounds": params["rounds"], "local-steps": params["local-steps"],
                 "fraction-train": fraction, "fraction-evaluate": fraction,
                 "min-available-clients": clients, "eval-episodes": 2,
                 "buffer-size": params["buffer-size"], "learning-starts": 100,
                 "run-dir": str(run_dir)}
    scenario = load_scenario(SCENARIOS_DIR / "hetero_cartpole.toml", clients, app_defaults(),
                             overrides)
    _, run_config = resolve_run_config({**scenario.run_config(), **overrides}, clients)
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    result = simulate(run_config, clients, cpus_per_client=params["cpus-per-client"],
                      stream=False, timeout=3600)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if not result.ok:
        raise RuntimeError(f"N={clients}: run ended {result.status}; see "
                           f"{run_dir / 'flower.log'}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    devices = [d for d in (run_dir / "devices").iterdir() if d.is_dir()]
    return {
        "virtual clients": clients, "fraction": fraction,
        "trained per round": [r["train"]["clients"] for r in rows],
        "evaluated per round": [r["eval"]["clients"] for r in rows],
        "devices with state on disk": len(devices),
        "disk KiB per device": sum(du_kib(d) for d in devices) / max(len(devices), 1),
        "peak RSS MiB": sampler.peak_rss / 1024, "peak PSS MiB": sampler.peak_pss / 1024,
        "peak processes": sampler.peak_processes,
        "median round s": sorted(r["round-seconds"] for r in rows)[len(rows) // 2],
        "wall s": wall,
    }


SCALE_RUN = CellKind("scale-run", run_one, (
    *PRODUCT_CODE, "fedq.simulations.bench_scale", "fedq.simulations.run",
    "fedq.simulations.flower_runtime", "fedq.simulations.scenario"))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """The small federation (every device sampled) and the large one (a share of it)."""
    shared = {k: params[k] for k in ("rounds", "local-steps", "buffer-size",
                                     "cpus-per-client")}
    return [Cell(SCALE_RUN, {**shared, "clients": params["small"], "fraction": 1.0}),
            Cell(SCALE_RUN, {**shared, "clients": params["large"],
                             "fraction": params["large-fraction"]})]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    table = [result for _, result in done]
    columns = ["virtual clients", "fraction", "trained per round", "evaluated per round",
               "devices with state on disk", "disk KiB per device", "peak RSS MiB",
               "peak PSS MiB", "peak processes", "median round s", "wall s"]
    backend = {"backend": "ray (Flower simulation engine default)",
               "client-resources-num-cpus": params["cpus-per-client"],
               "client-resources-num-gpus": 0.0,
               "init-args-num-cpus": "Ray default: all cores visible",
               "cores": len(os.sched_getaffinity(0)),
               "concurrent ClientApp actors": len(os.sched_getaffinity(0))
               // params["cpus-per-client"]}
    text = (f"Simulation backend settings: {json.dumps(backend)}. Memory is the peak over the "
            "run of the summed memory of every process the benchmark started, sampled every "
            "0.5 s.")
    payload: dict[str, Any] = {"runs": table, "backend": backend}
    if len(table) == 2:
        small, large = table
        extra = large["virtual clients"] - small["virtual clients"]
        per_client_pss = (large["peak PSS MiB"] - small["peak PSS MiB"]) / extra * 1024
        per_client_rss = (large["peak RSS MiB"] - small["peak RSS MiB"]) / extra * 1024
        payload.update({"marginal-KiB-per-client-pss": per_client_pss,
                        "marginal-KiB-per-client-rss": per_client_rss})
        text = (f"Marginal memory per extra virtual client ({large['virtual clients']} vs "
                f"{small['virtual clients']} devices, same work per round): "
                f"{per_client_pss:.1f} KiB PSS, {per_client_rss:.1f} KiB RSS in memory (near "
                "zero or negative: below the run-to-run noise of the Ray processes, i.e. "
                "memory does not grow with the number of virtual clients), plus "
                f"{large['disk KiB per device']:.0f} KiB on disk per device that has trained "
                f"(replay buffer of up to {params['buffer-size']} transitions, learner, "
                f"counters).\n\n{text}")

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        labels = [f"{r['virtual clients']} virtual, {r['fraction']:g} per round" for r in table]
        ax.bar(labels, [r["peak PSS MiB"] for r in table], label="peak PSS")
        ax.plot(labels, [r["peak RSS MiB"] for r in table], "ko", label="peak RSS")
        ax.set_ylabel("MiB, all processes of the run")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Summary(table, columns, text, payload, plot)


register_benchmark(Benchmark(
    "scale", "100 virtual clients, 10 per round, vs 10 clients: memory and disk per device",
    defaults={"small": 10, "large": 100, "large-fraction": 0.1, "rounds": 3,
              "local-steps": 500, "buffer-size": 5000, "cpus-per-client": 1},
    quick={"small": 2, "large": 4, "large-fraction": 0.5, "rounds": 1, "local-steps": 100},
    cells=cells, summarise=summarise, parallel=False))
