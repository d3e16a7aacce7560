"""A Raspberry-Pi-class SuperNode under Docker: its round time and memory, per backend (the
``pi`` harness benchmark's cell, :data:`PI_RUN`; :mod:`simulations.bench_docker`).

Runs the project's docker-compose.yml for real (engine, offline image build and compose
project as :mod:`simulations.compose_check` provides them) with the compose file's own
run settings except the number of rounds, one federation per device backend. Every
device uses that backend (in the run config and in its node config, as a device names
its own). ``supernode-3`` gets a Pi's limits (``--cpus``, ``--memory``, no swap beyond
them); ``supernode-1`` runs unconstrained in the same federation as the comparison.

For both nodes it reports: per-round handler seconds (the device's time for the round's
message: training and the fused evaluation), local training seconds, and memory: the
kernel's high-water mark of the container's cgroup (``memory.max_usage_in_bytes`` on
cgroup v1, ``memory.peak`` on v2; counts page cache), the sampled peak of its working set
(usage minus inactive file cache, what ``docker stats`` shows), the sampled peak of the
summed PSS of the container's processes (pages shared by the fork server's children
counted once), OOM kills and the CPU throttling the limit caused. Medians are over rounds
2 and on (round 1 includes starting the containers). The host's load average is sampled
next to the timings: this machine's 2 cores are shared, a Pi's 4 are not.

One cell is one backend's federation; the engine, base image, wheels and build context
are :mod:`simulations.compose_check`'s (:data:`~simulations.compose_check.ENGINE_WORK`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedq.simulations.compose_check import (
    ENGINE_WORK,
    IMAGE,
    PI_SERVICE,
    SUBMIT_SERVICE,
    Compose,
    MemorySampler,
    compose_project,
    container_state,
    node_ids,
    pi_override,
    rows,
)
from fedq.simulations.compose_topology import COMPOSE, argv, load_compose, supernode_services
from fedq.simulations.docker_engine import (
    EngineError,
    build_image,
    docker_engine,
    download_wheels,
    ensure_base_image,
    log,
    run,
)
from fedq.simulations.harness import PRODUCT_CODE, CellKind, HarnessError

REFERENCE_SERVICE = "supernode-1"
BACKENDS = ("numpy", "torch")


def run_override(backend: str, rounds: int, local_steps: int, timeout: int) -> dict[str, Any]:
    """The compose file's submit command with ``rounds`` rounds, ``local_steps``, the
    backend and a fresh run each time; every SuperNode's node config names the backend;
    the project network is internal (the containers reach each other and nothing else)."""
    compose = load_compose(COMPOSE)
    command = argv({"command": compose["services"][SUBMIT_SERVICE]["command"]})
    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    fixed = {"num-server-rounds": rounds, "local-steps": local_steps, "backend": backend,
             "resume": "false", "round-timeout": timeout,
             "run-dir": f"/data/runs/pi-{backend}"}
    sets = [s for s in sets if s.split("=", 1)[0] not in fixed]
    sets += [f"{key}={value}" for key, value in fixed.items()]
    services: dict[str, Any] = {
        SUBMIT_SERVICE: {"command": [x for s in sets for x in ("--set", s)]}}
    for name, service in supernode_services(compose).items():
        node_args = list(service["command"])
        at = node_args.index("--node-config") + 1
        node_args[at] = f"{node_args[at]} backend='{backend}'"
        services[name] = {"command": node_args}
    return {"services": services, "networks": {"default": {"internal": True}}}


class ContainerSampler(MemorySampler):
    """:class:`MemorySampler` plus the summed PSS of the container's processes (from
    ``/proc/<pid>/smaps_rollup``; its tasks are host PIDs in ``cgroup.procs``) and the
    CPU throttling of its cgroup (``cpu.stat``), sampled every second."""

    def __init__(self, container: str) -> None:
        super().__init__(container)
        self.pss_peak_kb = 0
        self.processes_at_pss_peak = 0
        self.cpu_stat: dict[str, int] = {}

    def _sample(self, cgroup: Path) -> None:
        super()._sample(cgroup)
        pids = (cgroup / "cgroup.procs").read_text().split()
        pss = sum(_pss_kb(pid) for pid in pids)
        if pss > self.pss_peak_kb:
            self.pss_peak_kb, self.processes_at_pss_peak = pss, len(pids)
        cpu = _cpu_cgroup(cgroup)
        if cpu is not None and (cpu / "cpu.stat").exists():
            self.cpu_stat = {k: int(v) for k, v in (line.split() for line in
                                                    (cpu / "cpu.stat").read_text().splitlines())}

    def report(self) -> dict[str, Any]:
        throttled = self.cpu_stat.get("throttled_time", 0) / 1e9 or \
            self.cpu_stat.get("throttled_usec", 0) / 1e6
        return {**super().report(), "pss-peak-mib": round(self.pss_peak_kb / 1024, 1),
                "processes-at-pss-peak": self.processes_at_pss_peak,
                "cpu-periods-throttled": self.cpu_stat.get("nr_throttled", 0),
                "cpu-periods": self.cpu_stat.get("nr_periods", 0),
                "cpu-throttled-seconds": round(throttled, 1)}


def _pss_kb(pid: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _cpu_cgroup(memory_cgroup: Path) -> Path | None:
    """The container's CPU cgroup: the same directory on v2, the cpu controller's on v1."""
    if (memory_cgroup / "cpu.stat").exists():
        return memory_cgroup
    relative = memory_cgroup.relative_to(Path("/sys/fs/cgroup") / "memory")
    for controller in ("cpu,cpuacct", "cpu"):
        candidate = Path("/sys/fs/cgroup") / controller / relative
        if candidate.exists():
            return candidate
    return None


class LoadSampler(contextlib.AbstractContextManager):
    """The host's 1-minute load average every 5 s while a run goes on."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        self.values.append(os.getloadavg()[0])
        while not self._stop.wait(5.0):
            self.values.append(os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def report(self) -> dict[str, float]:
        return {"min": round(min(self.values), 2),
                "median": round(statistics.median(self.values), 2),
                "max": round(max(self.values), 2)}


def _per_round(client_rows: list[dict[str, Any]], nodes: set[int], key: str) -> dict[int, float]:
    """``key`` of the nodes' train replies, by round (the node's restarts included)."""
    return {r["round"]: round(r[key], 2) for r in client_rows
            if r["node-id"] in nodes and r.get("phase") == "train" and key in r}


def _median_from_2(by_round: dict[int, float]) -> float | None:
    later = [v for r, v in by_round.items() if r >= 2]
    return round(statistics.median(later), 2) if later else None


def measure(engine: Any, work: Path, backend: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """One federation: every device on ``backend``, the Pi node limited."""
    files = {"run": run_override(backend, params["rounds"], params["local-steps"],
                                 params["round-timeout"]),
             "pi": pi_override(params["cpus"], params["memory"])}
    paths = []
    for name, data in files.items():
        path = work / f"compose.{name}-{backend}.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False, width=1 << 20))
        paths.append(path)
    compose = Compose(engine, *paths)
    with compose_project(compose):
        compose.run("up", "--no-start", "--no-build")
        pi_container = compose.container(PI_SERVICE)
        reference = compose.container(REFERENCE_SERVICE)
        started = time.monotonic()
        with ContainerSampler(pi_container) as pi, ContainerSampler(reference) as ref, \
                LoadSampler() as load:
            code = compose.run("up", "--no-build", "--exit-code-from", SUBMIT_SERVICE,
                               check=False)
        wall = time.monotonic() - started
        run_dir = compose.volume_dir("runs") / f"pi-{backend}"
        metrics = rows(run_dir / "metrics.jsonl")
        clients = rows(run_dir / "clients.jsonl")
        nodes = {"pi": set(node_ids(pi_container)), "ref": set(node_ids(reference))}
        state = container_state(pi_container)
    round_seconds = {r["round"]: round(r["round-seconds"], 2) for r in metrics}
    out: dict[str, Any] = {
        "exit-code": code, "wall-seconds": round(wall, 1),
        "rounds-completed": len(metrics),
        "round-seconds": round_seconds,
        "round-seconds-median-2-on": _median_from_2(round_seconds),
        "load-average-1min": load.report(),
        "pi-oom-killed": state["OOMKilled"], "pi-restarts": state["RestartCount"],
    }
    for label, sampler, service in (("pi", pi, PI_SERVICE), ("unconstrained", ref,
                                                              REFERENCE_SERVICE)):
        key = "pi" if label == "pi" else "ref"
        handler = _per_round(clients, nodes[key], "handler-seconds")
        training = _per_round(clients, nodes[key], "train-seconds")
        out[label] = {"service": service, "memory": sampler.report(),
                      "handler-seconds": handler, "train-seconds": training,
                      "handler-seconds-median-2-on": _median_from_2(handler),
                      "train-seconds-median-2-on": _median_from_2(training)}
    return out


def run_pi(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """The harness cell: engine, image and one federation of ``params["backend"]``
    devices. A federation that fails is the result's ``error`` (a finding, kept); no
    engine or no image raises :class:`HarnessError`, so nothing is cached and the next
    run tries again."""
    work = ENGINE_WORK.resolve()
    work.mkdir(parents=True, exist_ok=True)
    backend = params["backend"]
    try:
        with docker_engine(work) as engine:
            base = ensure_base_image(work, None)
            build_seconds = build_image(work, IMAGE, base, download_wheels(work))
            image = {"base": base, "build-seconds": round(build_seconds, 1),
                     "engine": run(["docker", "version", "-f", "{{.Server.Version}}"],
                                   timeout=60).stdout.strip()}
            log(f"pi emulation: {backend} backend")
            try:
                return {"image": image, **measure(engine, work, backend, params)}
            except (EngineError, OSError, KeyError, ValueError) as error:
                return {"image": image, "error": f"{type(error).__name__}: {error}"}
    except (EngineError, OSError) as error:
        raise HarnessError(f"pi ({backend}): no Docker engine or image, nothing measured "
                           f"(not cached): {type(error).__name__}: {error}") from error


def table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (backend, node): handler, training and round seconds, memory peaks."""
    rows_ = []
    for backend, r in results.items():
        if "error" in r:
            rows_.append({"backend": backend, "node": "-", "handler s (med. r2+)": r["error"]})
            continue
        for label in ("pi", "unconstrained"):
            node, mem = r[label], r[label]["memory"]
            rows_.append({
                "backend": backend, "node": label,
                "handler s (med. r2+)": node["handler-seconds-median-2-on"],
                "training s (med. r2+)": node["train-seconds-median-2-on"],
                "round s (med. r2+)": r["round-seconds-median-2-on"],
                "cgroup peak MiB": mem["kernel-peak-mib"],
                "working-set peak MiB": mem["working-set-peak-mib"],
                "PSS peak MiB": mem["pss-peak-mib"],
                "OOM kills": mem["processes-oom-killed"],
                "CPU throttled s": mem["cpu-throttled-seconds"],
                "load 1-min (median)": r["load-average-1min"]["median"],
                "exit": r["exit-code"]})
    return rows_


TABLE_COLUMNS = ["backend", "node", "handler s (med. r2+)", "training s (med. r2+)",
                 "round s (med. r2+)", "cgroup peak MiB", "working-set peak MiB",
                 "PSS peak MiB", "OOM kills", "CPU throttled s", "load 1-min (median)", "exit"]
PI_RUN = CellKind("pi-run", run_pi, (
    *PRODUCT_CODE, "fedq.simulations.pi_emulation", "fedq.simulations.compose_check",
    "fedq.simulations.docker_engine", "fedq.simulations.compose_topology"))
