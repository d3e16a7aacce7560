"""``docker compose up`` of the project's docker-compose.yml, for real: the ``compose``
harness cell (:data:`COMPOSE_CHECK`; the benchmarks ``compose`` and ``compose_pi1g``,
:mod:`simulations.bench_docker`).

Gets a Docker engine (starting one where none runs, see :mod:`simulations.docker_engine`),
builds ``fedq:latest`` offline from the project's Dockerfile, and runs docker-compose.yml
with a short-run override (:func:`override`: tiny DQN, few rounds, the project network
``internal``). Checks:

1. ``complete``: ``up --exit-code-from submit`` ends by itself with exit 0 and the run's
   metrics hold every round once. One SuperNode runs with a Raspberry Pi's 1 CPU and
   512 MiB here (:func:`pi_override`); its round time, peak memory and any out-of-memory
   kill are reported.
2. ``second-up``: the same ``up`` again on the same volumes succeeds and repeats nothing.
3. ``node-rejoins``: a SuperNode container killed (``docker kill``) in the middle of a
   round and started again rejoins and continues from its state-dir (its step counters).
4. ``resume``: after the SuperLink container is killed mid-run and started again, the
   submit service resubmitted with ``FEDQ_RESUME=true`` finishes the run with every round
   exactly once in metrics.jsonl.

Returns a report (timings, every check's outcome). Everything it starts is removed again
(``down -v``, and the engine if it started one). The engine's data, the base image's
root file system, the wheels and the build context live in :data:`ENGINE_WORK`, shared by
every Docker cell and kept between them (a rebuild reuses the image's cached layers).
docs/compose.md explains it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from fedq.simulations.compose_topology import (
    COMPOSE,
    SUBMIT_SERVICE,
    SUPERLINK_SERVICE,
    TINY_RUN,
    argv,
    load_compose,
)
from fedq.simulations.docker_engine import (
    ROOT,
    Engine,
    EngineError,
    build_image,
    docker_engine,
    download_wheels,
    ensure_base_image,
    log,
    run,
)
from fedq.simulations.harness import PRODUCT_CODE, CellKind, HarnessError

PROJECT = "fedqcheck"
IMAGE = "fedq:latest"
PI_SERVICE = "supernode-3"
VICTIM_SERVICE = "supernode-1"
ROUND_TIMEOUT = 240
#: Seconds any one compose phase may take on a loaded 2-core machine before it fails.
PHASE_TIMEOUT = 1500.0
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
ENGINE_WORK = _CACHE / "fedq" / "compose-check"
"""Engine data, base image root file system, wheels and build context of every Docker cell,
in the user's cache, not the checkout: its ~275,000 files (12 GB) under the project made
every ``flwr run`` of the checkout (fedq-simulate bundles the app by walking its folder)
take 30-80 s more, and slowed every tool that walks the tree."""


def override() -> dict[str, Any]:
    """The short-run override: the compose file's submit command with a tiny run and
    ``${FEDQ_ROUNDS}`` rounds, and an internal network (the containers reach each other
    and nothing else)."""
    compose = load_compose(COMPOSE)
    keep = ("run-dir=", "resume=", "min-available-clients=")
    command = argv({"command": compose["services"][SUBMIT_SERVICE]["command"]})
    sets = [command[i + 1] for i, a in enumerate(command)
            if a == "--set" and command[i + 1].startswith(keep)]
    sets += ["num-server-rounds=${FEDQ_ROUNDS:-3}", f"round-timeout={ROUND_TIMEOUT}"]
    sets += [f"{key}={value}" for key, value in TINY_RUN.items()]
    return {
        "services": {SUBMIT_SERVICE: {"command": [x for s in sets for x in ("--set", s)]}},
        "networks": {"default": {"internal": True}},
    }


def pi_override(cpus: float, memory: str) -> dict[str, Any]:
    """One SuperNode with a Raspberry Pi's CPU and memory (no swap beyond the limit).
    Only the ``complete`` run uses it, so an out-of-memory kill there cannot confound the
    fault checks."""
    return {"services": {PI_SERVICE: {"cpus": cpus, "mem_limit": memory,
                                      "memswap_limit": memory}}}


class Compose:
    """The compose project under test: its command line, containers and volumes."""

    def __init__(self, engine: Engine, *overrides: Path) -> None:
        self.base = [*engine.compose, "-p", PROJECT, "-f", str(COMPOSE),
                     *[x for path in overrides for x in ("-f", str(path))]]

    def command(self, *args: str) -> list[str]:
        return [*self.base, *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = PHASE_TIMEOUT, check: bool = True) -> int:
        done = run(self.command(*args), timeout=timeout, check=check,
                   env={**os.environ, **(env or {})}, cwd=ROOT)
        return done.returncode

    def container(self, service: str) -> str:
        """The id of the service's (only) container."""
        ids = run(self.command("ps", "-a", "-q", service), timeout=120,
                  cwd=ROOT).stdout.split()
        if len(ids) != 1:
            raise EngineError(f"service {service}: expected one container, found {ids}")
        return ids[0]

    def volume_dir(self, volume: str) -> Path:
        """Where the engine keeps the named volume (a local engine; read as root)."""
        done = run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}",
                    f"{PROJECT}_{volume}"], timeout=60)
        return Path(done.stdout.strip())


def rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def wait_for(what: str, predicate, timeout: float = PHASE_TIMEOUT, interval: float = 2.0):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise EngineError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def node_ids(container: str, since: str | None = None) -> list[int]:
    """SuperNode ids the container's log reports, oldest first (one per registration)."""
    args = ["docker", "logs", *(["--since", since] if since else []), container]
    done = run(args, timeout=60)
    return [int(m) for m in _NODE_ID.findall(done.stdout + done.stderr)]


def container_state(container: str) -> dict[str, Any]:
    done = run(["docker", "inspect", "-f", "{{json .State}} {{.RestartCount}}", container],
               timeout=60)
    state, restarts = done.stdout.rsplit(" ", 1)
    return {**json.loads(state), "RestartCount": int(restarts)}


class MemorySampler:
    """Peak memory of one container, sampled from its cgroup every second: the kernel's
    own high-water mark where it keeps one (cgroup v1 ``memory.max_usage_in_bytes``, v2
    ``memory.peak``; both count page cache), the sampled maximum of what ``docker
    stats`` shows (usage minus inactive file cache), and how many processes the kernel
    killed for the limit (``oom_kill``; Docker's OOMKilled flag only says "some")."""

    def __init__(self, container: str) -> None:
        self.container = container
        self.kernel_peak = 0
        self.working_set_peak = 0
        self.oom_kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _cgroup(self) -> Path | None:
        for pattern in (f"memory/docker/{self.container}*", f"docker/{self.container}*",
                        f"system.slice/docker-{self.container}*.scope"):
            found = sorted(Path("/sys/fs/cgroup").glob(pattern))
            if found:
                return found[0]
        return None

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            cgroup = self._cgroup()
            if cgroup is None:
                continue
            with contextlib.suppress(OSError, ValueError):
                self._sample(cgroup)

    def _sample(self, cgroup: Path) -> None:
        v1 = (cgroup / "memory.max_usage_in_bytes").exists()
        peak = cgroup / ("memory.max_usage_in_bytes" if v1 else "memory.peak")
        if peak.exists():
            self.kernel_peak = max(self.kernel_peak, int(peak.read_text()))
        usage = int((cgroup / ("memory.usage_in_bytes" if v1 else "memory.current"))
                    .read_text())
        stat = dict(line.split() for line in (cgroup / "memory.stat").read_text()
                    .splitlines())
        inactive = int(stat.get("total_inactive_file" if v1 else "inactive_file", 0))
        self.working_set_peak = max(self.working_set_peak, usage - inactive)
        events = cgroup / ("memory.oom_control" if v1 else "memory.events")
        counts = dict(line.split() for line in events.read_text().splitlines())
        self.oom_kills = max(self.oom_kills, int(counts.get("oom_kill", 0)))

    def report(self) -> dict[str, float]:
        mib = 1024 * 1024
        return {"kernel-peak-mib": round(self.kernel_peak / mib, 1),
                "working-set-peak-mib": round(self.working_set_peak / mib, 1),
                "processes-oom-killed": self.oom_kills}


def check_complete(compose: Compose, runs: dict[str, Path], rounds: int,
                   pi: dict[str, Any]) -> dict[str, Any]:
    """`up --exit-code-from submit` ends by itself with 0, every round once; measures
    the Pi-class node meanwhile (``compose`` includes :func:`pi_override`)."""
    env = {"FEDQ_RUN": "complete", "FEDQ_ROUNDS": str(rounds)}
    compose.run("up", "--no-start", "--no-build", env=env)  # containers, not started yet
    runs["dir"] = compose.volume_dir("runs")
    pi_container = compose.container(PI_SERVICE)
    started = time.monotonic()
    with MemorySampler(pi_container) as sampler:
        code = compose.run("up", "--no-build", "--exit-code-from", SUBMIT_SERVICE, env=env,
                           check=False)
    wall = time.monotonic() - started
    run_dir = runs["dir"] / "complete"
    metrics = rows(run_dir / "metrics.jsonl")
    pi_ids = set(node_ids(pi_container))
    pi_rows = [r for r in rows(run_dir / "clients.jsonl") if r["node-id"] in pi_ids]
    other = [r for r in rows(run_dir / "clients.jsonl") if r["node-id"] not in pi_ids]
    state = container_state(pi_container)
    pi.update({
        "service": PI_SERVICE,
        "memory": sampler.report(),
        "oom-killed": state["OOMKilled"],
        "restarts": state["RestartCount"],
        "round-seconds": [r["round-seconds"] for r in metrics],
        "train-handler-seconds": _per_round(pi_rows, "train", "handler-seconds"),
        "train-seconds": _per_round(pi_rows, "train", "train-seconds"),
        "unlimited-nodes-train-handler-seconds": _per_round(other, "train",
                                                            "handler-seconds"),
    })
    passed = code == 0 and [r["round"] for r in metrics] == list(range(1, rounds + 1))
    return {"complete": {"passed": passed, "exit-code": code, "wall-seconds": round(wall, 1),
                         "rounds": [r["round"] for r in metrics],
                         "round-seconds": [r["round-seconds"] for r in metrics],
                         "final-status-line": _last_submit_line(compose)}}


def _per_round(client_rows: list[dict[str, Any]], phase: str, key: str) -> list[list]:
    return [[r["round"], round(r[key], 2)] for r in client_rows
            if r.get("phase") == phase and key in r]


def _last_submit_line(compose: Compose) -> str:
    done = run(compose.command("logs", "--no-color", "--tail", "5", SUBMIT_SERVICE),
               timeout=60, cwd=ROOT, check=False)
    lines = [line for line in done.stdout.splitlines() if "fedq-submit" in line]
    return lines[-1].split("|", 1)[-1].strip() if lines else ""


def check_second_up(compose: Compose, runs: dict[str, Path], rounds: int) -> dict[str, Any]:
    """The same `up` on the same volumes: resumes the finished run, repeats nothing."""
    env = {"FEDQ_RUN": "complete", "FEDQ_ROUNDS": str(rounds)}
    started = time.monotonic()
    code = compose.run("up", "--no-build", "--exit-code-from", SUBMIT_SERVICE, env=env,
                       check=False)
    metrics = rows(runs["dir"] / "complete" / "metrics.jsonl")
    passed = code == 0 and [r["round"] for r in metrics] == list(range(1, rounds + 1))
    return {"second-up": {"passed": passed, "exit-code": code,
                          "wall-seconds": round(time.monotonic() - started, 1),
                          "rounds": [r["round"] for r in metrics],
                          "final-status-line": _last_submit_line(compose)}}


def check_faults(compose: Compose, runs: dict[str, Path], rounds: int) -> dict[str, Any]:
    """Kill a SuperNode mid-round, then the SuperLink mid-run; resume the submit service."""
    env = {"FEDQ_RUN": "faults", "FEDQ_ROUNDS": str(rounds)}
    run_dir = runs["dir"] / "faults"
    devices = compose.volume_dir("devices")
    compose.run("up", "-d", "--no-build", env=env)
    started = time.monotonic()
    victim = compose.container(VICTIM_SERVICE)
    superlink = compose.container(SUPERLINK_SERVICE)
    submit = compose.container(SUBMIT_SERVICE)

    def metric_rounds() -> list[int]:
        return [r["round"] for r in rows(run_dir / "metrics.jsonl")]

    wait_for("round 1 of the fault run", lambda: 1 in metric_rounds())
    mark = _engine_time()
    wait_for(f"{VICTIM_SERVICE} to receive round 2's train message",
             lambda: "train message" in _logs(victim, since=mark), interval=0.5)
    time.sleep(1.0)  # inside its local training
    run(["docker", "kill", victim], timeout=60)
    victim_round = max(metric_rounds(), default=0) + 1
    state_dir = devices / "node-1"
    counters = _counters(state_dir)
    generation_at_kill = (state_dir / "CURRENT").read_text().strip()
    killed_at = _engine_time()
    run(["docker", "start", victim], timeout=120)
    new_id = wait_for(f"{VICTIM_SERVICE} to register again",
                      lambda: node_ids(victim, since=killed_at))[-1]
    # its first save after the restart: one training on top of the state at the kill (a
    # device that started afresh or fell back to an older generation saves other counters)
    after_restart = wait_for(f"{VICTIM_SERVICE}'s first save after its restart",
                             lambda: _counters_after(state_dir, generation_at_kill),
                             interval=0.1)

    wait_for("round 3 of the fault run", lambda: 3 in metric_rounds())
    time.sleep(3.0)  # into round 4
    before_crash = metric_rounds()
    run(["docker", "kill", superlink], timeout=60)
    run(["docker", "start", superlink], timeout=120)  # as a supervisor would
    submit_exit = int(run(["docker", "wait", submit], timeout=600).stdout.strip())
    compose.run("up", "-d", "--no-build", "--no-deps", SUBMIT_SERVICE,
                env={**env, "FEDQ_RESUME": "true"})
    resumed_exit = int(run(["docker", "wait", submit], timeout=PHASE_TIMEOUT).stdout.strip())
    wall = time.monotonic() - started

    replies = [r for r in rows(run_dir / "clients.jsonl")
               if r["node-id"] == new_id and r["phase"] == "train"]
    first = replies[0] if replies else {}
    rejoined = {
        "passed": bool(replies)
        and after_restart["env_steps"] == counters["env_steps"] + TINY_RUN["local-steps"]
        and after_restart["rounds"] == counters["rounds"] + 1,
        "killed-in-round": victim_round,
        "state-on-disk-at-kill": {"env-steps": counters["env_steps"],
                                  "rounds": counters["rounds"]},
        "first-save-after-restart": {"env-steps": after_restart["env_steps"],
                                     "rounds": after_restart["rounds"]},
        "first-reply-after-restart": {k: first.get(k) for k in
                                      ("round", "env-steps-total", "rounds-total")},
    }
    final = metric_rounds()
    resumed = {
        "passed": resumed_exit == 0 and final == list(range(1, rounds + 1)),
        "rounds-before-superlink-kill": before_crash,
        "submit-exit-after-kill": submit_exit,
        "resumed-submit-exit": resumed_exit,
        "rounds": final,
        "wall-seconds-of-fault-run": round(wall, 1),
        "final-status-line": _last_submit_line(compose),
    }
    return {"node-rejoins": rejoined, "resume": resumed}


def _engine_time() -> str:
    """Now, as an RFC 3339 timestamp for ``docker logs --since``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def _logs(container: str, since: str) -> str:
    done = run(["docker", "logs", "--since", since, container], timeout=60)
    return done.stdout + done.stderr


def _counters(state_dir: Path) -> dict[str, Any]:
    generation = (state_dir / "CURRENT").read_text().strip()
    return json.loads((state_dir / generation / "counters.json").read_text())


def _counters_after(state_dir: Path, generation: str) -> dict[str, Any] | None:
    """The device's counters once its current generation is no longer ``generation``."""
    with contextlib.suppress(OSError, ValueError):
        if (state_dir / "CURRENT").read_text().strip() != generation:
            return _counters(state_dir)
    return None


@contextlib.contextmanager
def compose_project(compose: Compose) -> Iterator[None]:
    """Start from nothing and leave nothing: containers, network and volumes."""
    compose.run("down", "-v", "--remove-orphans", timeout=300)
    try:
        yield
    finally:
        compose.run("down", "-v", "--remove-orphans", timeout=300, check=False)


def check(params: Mapping[str, Any], work: Path = ENGINE_WORK) -> dict[str, Any]:
    """Provide engine and image, run the checks; the report (also when checks fail; no
    engine, image or topology before any check raises :class:`HarnessError`).
    ``params``: ``rounds``, ``fault-rounds``, ``skip-faults``, ``pi-cpus``, ``pi-memory``,
    ``base-image`` ("": python:3.11-slim if present, else a debootstrapped Debian bookworm)
    and ``pip-download-args`` (extra ``pip download`` arguments, e.g. an index where pip's
    configuration does not find torch's +cpu wheel)."""
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started-utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checks": {}, "passed": False}
    started = time.monotonic()
    try:
        with docker_engine(work) as engine:
            report["engine"] = {"compose": " ".join(engine.compose),
                                "started-here": engine.started_here,
                                "dockerd-pid": engine.dockerd_pid,
                                "server-version": run(["docker", "version", "-f",
                                                       "{{.Server.Version}}"],
                                                      timeout=60).stdout.strip()}
            base = ensure_base_image(work, params["base-image"] or None)
            wheels = download_wheels(work, shlex.split(params["pip-download-args"]))
            build_seconds = build_image(work, IMAGE, base, wheels)
            size = run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], timeout=60)
            report["image"] = {"base": base, "build-seconds": round(build_seconds, 1),
                               "size-mb": round(int(size.stdout) / 1e6)}
            short, pi_class = work / "compose.check.yml", work / "compose.pi.yml"
            report["override"] = override()
            report["pi-override"] = pi_override(params["pi-cpus"], params["pi-memory"])
            short.write_text(yaml.safe_dump(report["override"], sort_keys=False))
            pi_class.write_text(yaml.safe_dump(report["pi-override"], sort_keys=False))
            compose = Compose(engine, short)
            runs: dict[str, Path] = {}
            pi: dict[str, Any] = {"cpus": params["pi-cpus"], "memory-limit": params["pi-memory"]}
            report["pi-class"] = pi
            with compose_project(compose):
                _record(report, ["complete"],
                        lambda: check_complete(Compose(engine, short, pi_class), runs,
                                               params["rounds"], pi))
                _record(report, ["second-up"],
                        lambda: check_second_up(compose, runs, params["rounds"]))
                if not params["skip-faults"]:
                    _record(report, ["node-rejoins", "resume"],
                            lambda: check_faults(compose, runs, params["fault-rounds"]))
    except (EngineError, OSError) as error:
        if not report["checks"]:  # the machine's fault, not a finding: cache nothing
            raise HarnessError(f"compose check: no Docker engine, image or topology, no "
                               f"check ran (not cached): {error}") from error
        report["error"] = str(error)
    report["wall-seconds"] = round(time.monotonic() - started, 1)
    report["passed"] = bool(report["checks"]) and "error" not in report and all(
        c.get("passed") for c in report["checks"].values())
    return report


def _record(report: dict[str, Any], names: list[str],
            step: Callable[[], dict[str, Any]]) -> None:
    """Run a step that yields the checks ``names``; an error fails them (and is kept)
    without skipping the clean-up or the later checks."""
    log(f"check {', '.join(names)}")
    try:
        report["checks"].update(step())
    except (EngineError, OSError, KeyError, ValueError, subprocess.TimeoutExpired) as error:
        failed = {"passed": False, "error": f"{type(error).__name__}: {error}"}
        report["checks"].update({name: failed for name in names})
    for name in names:
        log(f"check {name}: {'passed' if report['checks'][name].get('passed') else 'FAILED'}")


def run_compose_check(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """The harness cell: :func:`check` in the shared :data:`ENGINE_WORK`."""
    return check(params)


COMPOSE_CHECK = CellKind("compose-check", run_compose_check, (
    *PRODUCT_CODE, "fedq.simulations.compose_check", "fedq.simulations.docker_engine",
    "fedq.simulations.compose_topology"))
