"""The Docker-level benchmarks: ``docker compose up`` of docker-compose.yml for real
(``compose``, ``compose_pi1g``) and a Raspberry-Pi-class SuperNode per device backend
(``pi``). Each needs a Docker engine: as root on a machine without one, the cell installs
Debian's and starts its own (:mod:`simulations.docker_engine`), and stops it after.

- ``compose`` (:mod:`simulations.compose_check`): the run completes, a second ``up``
  repeats nothing, a killed SuperNode rejoins, a killed SuperLink's run resumes; one
  SuperNode has a Pi's 1 CPU and 512 MiB. ``compose_pi1g``: the first two checks with
  1 GiB for that node.
- ``pi`` (:mod:`simulations.pi_emulation`): one federation per backend, round time and
  memory of the limited node beside an unconstrained one.

Each cell's parameters carry the sha256 of the files the image and the topology are made
from (Dockerfile, docker-compose.yml, pyproject.toml), so editing one runs the cells again.

    sudo .venv/bin/python -m fedq.simulations.bench compose
    sudo .venv/bin/python -m fedq.simulations.bench pi --quick

Process-level: the cells time rounds and sample memory, so they never run side by side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from fedq.simulations.compose_check import COMPOSE_CHECK, PI_SERVICE
from fedq.simulations.docker_engine import ROOT
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    HarnessError,
    Summary,
    name_list,
    register_benchmark,
)
from fedq.simulations.pi_emulation import BACKENDS, PI_RUN, TABLE_COLUMNS, table

IMAGE_FILES = ("Dockerfile", "docker-compose.yml", "pyproject.toml")


def image_files_sha() -> str:
    """sha256 of the files the image and the compose topology are made from."""
    digest = hashlib.sha256()
    for name in IMAGE_FILES:
        digest.update(name.encode() + b"\n" + (ROOT / name).read_bytes())
    return digest.hexdigest()


def compose_cells(params: Mapping[str, Any]) -> list[Cell]:
    if params["rounds"] < 1:
        raise HarnessError(f"rounds: at least 1, got {params['rounds']}")
    if not params["skip-faults"] and params["fault-rounds"] < 5:
        raise HarnessError("fault-rounds: at least 5 (a node is killed in round 2, the "
                           f"SuperLink in round 4), got {params['fault-rounds']}")
    return [Cell(COMPOSE_CHECK, {**params, "files-sha": image_files_sha()})]


def summarise_compose(params: Mapping[str, Any], done: Done) -> Summary:
    ((_, report),) = done
    rows = [{"check": name, "passed": check.get("passed"), "exit code": check.get("exit-code"),
             "wall s": check.get("wall-seconds"), "rounds": check.get("rounds"),
             "error": check.get("error", "")} for name, check in report["checks"].items()]
    pi = report.get("pi-class", {})
    memory = pi.get("memory", {})
    image = report.get("image", {})
    error = f"; error: {report['error']}" if "error" in report else ""
    text = (f"**{'All checks passed' if report['passed'] else 'FAILED'}** in "
            f"{report['wall-seconds']} s{error}."
            f" Image on {image.get('base')}, built in {image.get('build-seconds')} s, "
            f"{image.get('size-mb')} MB; engine {report.get('engine', {}).get('server-version')}"
            f" (started here: {report.get('engine', {}).get('started-here')}). "
            f"{PI_SERVICE} at --cpus {params['pi-cpus']} --memory {params['pi-memory']}: "
            f"working-set peak {memory.get('working-set-peak-mib')} MiB, cgroup peak "
            f"{memory.get('kernel-peak-mib')} MiB, OOM-killed {pi.get('oom-killed')}; "
            f"round seconds {pi.get('round-seconds')}. The whole report is results.json's "
            "`report`.")
    return Summary(rows, ["check", "passed", "exit code", "wall s", "rounds", "error"], text,
                   payload={"report": report})


def pi_cells(params: Mapping[str, Any]) -> list[Cell]:
    if params["rounds"] < 2:
        raise HarnessError(f"rounds: at least 2 (medians are over rounds 2 and on), got "
                           f"{params['rounds']}")
    sha = image_files_sha()
    return [Cell(PI_RUN, {"backend": backend, "files-sha": sha, **{k: params[k] for k in (
        "rounds", "local-steps", "round-timeout", "cpus", "memory")}})
            for backend in name_list(params, "backends", list(BACKENDS))]


def summarise_pi(params: Mapping[str, Any], done: Done) -> Summary:
    results = {cell.params["backend"]: result for cell, result in done}
    text = (f"One SuperNode ({PI_SERVICE}) limited to --cpus {params['cpus']} --memory "
            f"{params['memory']} beside an unconstrained one (supernode-1) in the same "
            f"docker compose federation, one federation per backend; {params['rounds']} "
            f"rounds, local-steps {params['local-steps']}. Medians over rounds 2 and on; the "
            "load average is the host's (a Pi's cores are not shared).")
    return Summary(table(results), TABLE_COLUMNS, text, payload={"results": results})


_COMPOSE = {"rounds": 3, "fault-rounds": 5, "skip-faults": False, "pi-cpus": 1.0,
            "pi-memory": "512m", "base-image": "", "pip-download-args": ""}
register_benchmark(Benchmark(
    "compose", "docker compose up of docker-compose.yml under a real engine: completes, "
    "second up, a SuperNode and the SuperLink killed mid-run", defaults=_COMPOSE,
    quick={"rounds": 2, "skip-faults": True}, cells=compose_cells,
    summarise=summarise_compose, parallel=False))
register_benchmark(Benchmark(
    "compose_pi1g", "the compose check's run with 1 GiB for the Pi-class node (no fault "
    "checks)", defaults={**_COMPOSE, "skip-faults": True, "pi-memory": "1g"},
    quick={"rounds": 2}, cells=compose_cells, summarise=summarise_compose, parallel=False))
register_benchmark(Benchmark(
    "pi", "one SuperNode at a Pi's 1 CPU / 512 MiB under docker compose, per device backend: "
    "round time and memory", defaults={"backends": "numpy,torch", "rounds": 5,
                                       "local-steps": 2000, "round-timeout": 600, "cpus": 1.0,
                                       "memory": "512m"},
    quick={"backends": "numpy", "rounds": 2, "local-steps": 100}, cells=pi_cells,
    summarise=summarise_pi, parallel=False))
