"""Fault drill: inject faults at random moments into the real loopback topology, check
after each that nothing saved was lost, and print the table (faults by kind, survived,
lost, named).

The topology is the compose file's (``simulations.compose_topology``): a real
``flower-superlink``, three ``flower-supernode``s with their state dirs and the submit
service's ``fedq-submit``, as local processes (no Docker). One long run trains tiny rounds;
the drill resubmits it with ``resume=true`` right after it kills the ServerApp, and a
watcher resubmits whenever the latest submission ends by itself. Between faults the
drill sleeps a random 1-4 s, so faults land at random moments of a round (training,
saving, aggregating, evaluating). Fault kinds:

- ``node-kill9``: SIGKILL a SuperNode's whole tree, restart it after 0-3 s
- ``node-sigstop``: SIGSTOP a SuperNode's tree for 2-25 s (sometimes past round-timeout)
- ``clientapp-kill9``: SIGKILL a node's running ``flwr-clientapp`` (training or saving)
- ``restart-mid-save``: wait for a device's new generation folder to appear, SIGKILL the
  node at once and restart it
- ``serverapp-kill9``: SIGKILL the ``flwr-serverapp`` (the submitter resumes the run)
- ``serverapp-sigstop`` / ``superlink-sigstop``: SIGSTOP for 2-10 s
- ``disk-full``: a device's ClientApps get RLIMIT_FSIZE 4 KiB for 5-20 s, so writes fail
  as on a full disk (EFBIG; the machine's real disk is shared and is not filled)
- ``device-file``: truncate / garbage / remove one of a device's CURRENT, MANIFEST.json,
  replay_buffer.npz, learner.pt, counters.json (of its current generation)
- ``server-file``: truncate / garbage / remove checkpoints/LATEST, the newest checkpoint or
  its digest, or tear metrics.jsonl's last line; then SIGKILL the ServerApp so that the
  resume has to deal with it

Not injected: SIGKILL of the SuperLink (the SuperLink keeps its run state in memory, so it
ends every run; see docs/durability.md) and anything in Docker containers.

Faults follow each other without waiting for the run, except that after one that crashed
the ServerApp the drill waits (at most ``--settle`` seconds) for the resumed run to
complete a round. After each fault it checks:

- **lost**: ``metrics.jsonl`` holds rounds 1..N exactly once; every row ever seen is still
  in it or in ``metrics.superseded.jsonl``; each device's newest complete generation has at
  least the env steps of the newest one the drill did not damage; the newest complete
  checkpoint is no older than the newest one the drill did not damage; the run completed
  a round after the fault (judged when the drill ends).
- **named**: the fault shows under its name: a device failure with that node's id (or the
  error text "cannot save its state"), the damaged file's name (or its generation's) in the
  device's or server's log, the killed ServerApp's submission exiting non-zero. A fault
  with no visible effect (a SIGSTOP that ended before anyone waited, a file superseded
  by a save before anyone read it) counts as "no effect" rather than unnamed.

    python -m fedq.simulations.fault_drill --faults 120 --minutes 13 \\
        --out simulations/results/fault_drill/drill.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedq.common.state_store import MANIFEST_FILE, POINTER_FILE, generations
from fedq.simulations.compose_topology import TINY_RUN, Topology, compose_topology
from fedq.simulations.flower_runtime import kill_serverapp, node_pids, signal_serverapp

#: Fault kinds and how often each is drawn: the ones that crash the ServerApp cost a
#: resume (tens of seconds here), so they are drawn less often than device faults.
WEIGHTS = {"node-kill9": 1.0, "node-sigstop": 1.0, "clientapp-kill9": 1.5,
           "restart-mid-save": 1.0, "serverapp-kill9": 0.6, "serverapp-sigstop": 0.8,
           "superlink-sigstop": 0.8, "disk-full": 1.0, "device-file": 2.0,
           "server-file": 0.8}
KINDS = tuple(WEIGHTS)
CRASHES_SERVER = ("serverapp-kill9", "server-file")
DEVICE_FILES = (POINTER_FILE, MANIFEST_FILE, "replay_buffer.npz", "learner.pt",
                "counters.json")
DAMAGE = ("truncate", "garbage", "remove")
RUN = {**TINY_RUN, "local-steps": 100, "num-server-rounds": 100_000,
       "min-available-clients": 2, "eval-episodes": 1}


@dataclass
class Fault:
    kind: str
    target: str
    detail: str
    at: float
    round_before: int
    node_ids: list[int] = field(default_factory=list)
    needles: list[str] = field(default_factory=list)  # strings that name the fault
    logs: list[tuple[str, int]] = field(default_factory=list)  # (log path, offset)
    submission: int | None = None
    lost: list[str] = field(default_factory=list)
    named: str = "unnamed"  # named | no effect | unnamed
    progressed: bool = False
    slow: bool = False  # the resumed run needed longer than --settle for a round


class Drill:
    """The topology, the run, what has been seen, and the faults so far."""

    def __init__(self, topo: Topology, run_dir: Path, rng: random.Random, settle: float,
                 round_timeout: int) -> None:
        self.topo, self.run_dir, self.rng, self.settle = topo, run_dir, rng, settle
        self.overrides = {**RUN, "round-timeout": round_timeout}
        self.faults: list[Fault] = []
        self.seen_rows: set[tuple[int, float]] = set()
        self.device_floor = dict.fromkeys(topo.nodes, 0)
        self.checkpoint_floor = 0
        self.submissions: list[int | None] = []  # exit status of each submission
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # --- the run -------------------------------------------------------------------------
    def _submit(self) -> None:
        """Start a submission of the run (resume after the first) in its own thread."""
        index = len(self.submissions)
        self.submissions.append(None)
        overrides = {**self.overrides, "resume": index > 0}

        def run() -> None:
            self.submissions[index] = self.topo.submit(
                self.run_dir, overrides, log_name=f"submit-{index}.log", timeout=3600)

        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _watch(self) -> None:
        """Resubmit when the latest submission ended by itself (e.g. its ServerApp was
        declared dead during a SIGSTOP)."""
        while not self._stop.wait(1.0):
            if not self._threads[-1].is_alive() and not self._stop.is_set():
                self._submit()

    def _crash_server(self, fault: Fault) -> bool:
        """SIGKILL the ServerApp and resubmit at once (the killed submission ends only
        when the SuperLink notices the missing heartbeat); False if none ran."""
        pids = kill_serverapp(self.topo.link)
        fault.detail = (fault.detail + f" serverapp pids {pids}").strip()
        if pids:
            self._submit()
        return bool(pids)

    def start(self) -> None:
        self._submit()
        self._watcher.start()
        if not self.wait_for_round(1, timeout=600):
            raise RuntimeError(f"round 1 never finished; see {self.topo.workdir}")

    def stop(self) -> None:
        self._stop.set()
        kill_serverapp(self.topo.link)  # the topology's teardown ends the submissions

    def rows(self) -> list[dict[str, Any]]:
        return _jsonl(self.run_dir / "metrics.jsonl")

    def last_round(self) -> int:
        rows = self.rows()
        return rows[-1]["round"] if rows else 0

    def wait_for_round(self, server_round: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.last_round() >= server_round:
                return True
            time.sleep(0.5)
        return False

    # --- faults --------------------------------------------------------------------------
    def inject(self, kind: str) -> Fault:
        name = self.rng.choice(sorted(self.topo.nodes))
        fault = Fault(kind, name, "", time.time(), self.last_round(),
                      submission=len(self.submissions) - 1)
        try:
            getattr(self, "_" + kind.replace("-", "_"))(fault, name)
        except Exception as err:  # a drill bug must not end the drill: it is on record
            fault.detail += f" DRILL ERROR {type(err).__name__}: {err}"
        self.faults.append(fault)
        return fault

    def _node_log(self, fault: Fault, name: str) -> None:
        path = self.topo.nodes[name].log_path
        fault.logs.append((str(path), path.stat().st_size if path.exists() else 0))

    def _server_logs(self, fault: Fault) -> None:
        for path in [self.topo.link.log_path, *self.topo.workdir.glob("submit-*.log")]:
            fault.logs.append((str(path), path.stat().st_size))

    def _restart(self, name: str) -> None:
        """Start the node again without waiting for it to register (its new node id is
        read from its log when the faults are judged)."""
        self.topo.nodes[name].start()

    def _all_node_ids(self, name: str) -> list[int]:
        text = _read_from(self.topo.nodes[name].log_path, 0)
        return [int(m) for m in re.findall(r"SuperNode ID: (\d+)", text)]

    def _node_kill9(self, fault: Fault, name: str) -> None:
        self.topo.nodes[name].stop(kill=True)
        time.sleep(self.rng.uniform(0, 3))
        self._restart(name)

    def _node_sigstop(self, fault: Fault, name: str) -> None:
        # one in five past round-timeout: the node's reply expires while it trains
        past = self.rng.random() < 0.2
        seconds = (self.overrides["round-timeout"] + self.rng.uniform(2, 10) if past
                   else self.rng.uniform(2, 10))
        fault.detail = f"{seconds:.1f}s"
        _hold(node_pids(self.topo.nodes[name]), seconds)

    def _clientapp_kill9(self, fault: Fault, name: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = node_pids(self.topo.nodes[name], "flwr-clientapp")
            if pids:
                _signal(pids, signal.SIGKILL)
                fault.detail = f"pids {pids}"
                return
            time.sleep(0.05)
        fault.detail = "no clientapp ran within 10s"

    def _restart_mid_save(self, fault: Fault, name: str) -> None:
        state = self.topo.state_dirs[name]
        newest = max((g.number for g in generations(state)), default=0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            fresh = [p for p in state.glob("gen-*") if _number(p) > newest
                     and not (p / MANIFEST_FILE).exists()]
            if fresh:
                self.topo.nodes[name].stop(kill=True)
                fault.detail = f"killed while {fresh[0].name} was being written"
                break
            time.sleep(0.01)
        else:
            fault.detail = "no save seen within 20s; killed anyway"
            self.topo.nodes[name].stop(kill=True)
        self._restart(name)

    def _serverapp_kill9(self, fault: Fault, name: str) -> None:
        fault.target = "serverapp"
        self._crash_server(fault)

    def _serverapp_sigstop(self, fault: Fault, name: str) -> None:
        fault.target = "serverapp"
        seconds = self.rng.uniform(2, 10)
        fault.detail = f"{seconds:.1f}s"
        pids = signal_serverapp(self.topo.link, signal.SIGSTOP)
        time.sleep(seconds)
        _signal(pids, signal.SIGCONT)

    def _superlink_sigstop(self, fault: Fault, name: str) -> None:
        fault.target = "superlink"
        seconds = self.rng.uniform(2, 10)
        fault.detail = f"{seconds:.1f}s"
        _hold([self.topo.link.process.pid], seconds)

    def _disk_full(self, fault: Fault, name: str) -> None:
        seconds = self.rng.uniform(5, 20)
        fault.detail = f"{seconds:.1f}s"
        fault.needles = ["cannot save its state"]
        limited: dict[int, tuple[int, int]] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for pid in node_pids(self.topo.nodes[name], "flwr-clientapp"):
                if pid not in limited:
                    with contextlib.suppress(OSError):
                        old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                        resource.prlimit(pid, resource.RLIMIT_FSIZE, (4096, old[1]))
                        limited[pid] = old
            time.sleep(0.02)
        for pid, old in limited.items():
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
        fault.detail += f", {len(limited)} clientapp(s) limited"

    def _device_file(self, fault: Fault, name: str) -> None:
        state = self.topo.state_dirs[name]
        self._node_log(fault, name)
        which, how = self.rng.choice(DEVICE_FILES), self.rng.choice(DAMAGE)
        found = generations(state)
        complete = [g for g in found if g.problem is None]
        if which == POINTER_FILE:
            path = state / POINTER_FILE
        elif complete:
            path = complete[0].path / which
            # the damaged generation no longer counts: the floor is the spare's
            spare = complete[1] if len(complete) > 1 else None
            self.device_floor[name] = _env_steps(spare.path) if spare else 0
        else:
            fault.detail = "not injected: no complete generation to damage"
            return
        fault.needles = [path.name, path.parent.name if which != POINTER_FILE else "CURRENT"]
        fault.detail = f"{how} {path.relative_to(state)}"
        _damage(path, how, self.rng)

    def _server_file(self, fault: Fault, name: str) -> None:
        fault.target = "server"
        self._server_logs(fault)
        checkpoints = self.run_dir / "checkpoints"
        newest = sorted(checkpoints.glob("round-*.pt"))
        options = ["LATEST", "checkpoint", "digest", "metrics-tail"]
        which = self.rng.choice(options if newest else ["LATEST", "metrics-tail"])
        how = self.rng.choice(DAMAGE)
        if which == "metrics-tail":
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write('{"round": ')  # a crash in the middle of an append
            fault.needles = ["metrics.superseded.jsonl", "metrics.jsonl"]
            fault.detail = "torn last line of metrics.jsonl"
        else:
            path = {"LATEST": checkpoints / "LATEST",
                    "checkpoint": newest[-1] if newest else None,
                    "digest": newest[-1].with_name(newest[-1].name + ".sha256")
                    if newest else None}[which]
            assert path is not None
            if which in ("checkpoint", "digest"):
                self.checkpoint_floor = max(0, _round_of(newest[-2]) if len(newest) > 1
                                            else 0)
            fault.needles = [path.name.replace(".sha256", ""), "checkpoints/LATEST"]
            fault.detail = f"{how} {path.name}"
            _damage(path, how, self.rng)
        self._crash_server(fault)  # the resume must cope with the damage

    # --- checks --------------------------------------------------------------------------
    def check(self, fault: Fault, settle: bool) -> None:
        """Check the invariants (module docstring) right after a fault; with ``settle``
        (a fault that crashed the ServerApp) first wait for a round past it."""
        if settle and not self.wait_for_round(max(self.last_round(), fault.round_before) + 1,
                                              self.settle):
            fault.slow = True  # a stall shows in the final progress check
        rows = self.rows()
        rounds = [r["round"] for r in rows]
        if rounds != list(range(1, len(rounds) + 1)):
            fault.lost.append(f"metrics.jsonl rounds not 1..N once: {rounds[-10:]}")
        kept = {(r["round"], r.get("round-seconds")) for r in rows} | {
            (r["round"], r.get("round-seconds"))
            for r in _jsonl(self.run_dir / "metrics.superseded.jsonl") if "round" in r}
        if missing := self.seen_rows - kept:
            fault.lost.append(f"metrics rows gone: {sorted(missing)[:5]}")
        self.seen_rows |= {(r["round"], r.get("round-seconds")) for r in rows}
        for name, state in self.topo.state_dirs.items():
            complete = [g for g in generations(state) if g.problem is None]
            steps = _env_steps(complete[0].path) if complete else 0
            if steps < self.device_floor[name]:
                fault.lost.append(f"{name}: newest complete generation has {steps} env "
                                  f"steps, below {self.device_floor[name]}")
            self.device_floor[name] = max(self.device_floor[name], steps)
        ckpt = _newest_complete_checkpoint(self.run_dir)
        if ckpt < self.checkpoint_floor:
            fault.lost.append(f"newest complete checkpoint {ckpt} < {self.checkpoint_floor}")
        self.checkpoint_floor = max(self.checkpoint_floor, ckpt)

    def judge_names(self) -> None:
        """After the drill (logs complete): was each fault named? (module docstring)"""
        rows = self.rows() + _jsonl(self.run_dir / "metrics.superseded.jsonl")
        final = self.last_round()
        ids = {name: self._all_node_ids(name) for name in self.topo.nodes}
        for fault in self.faults:
            if fault.detail.startswith("not injected"):
                fault.named = "not injected"
                continue
            if fault.target in ids:
                fault.node_ids = ids[fault.target]
            fault.progressed = final > fault.round_before
            if not fault.progressed:
                fault.lost.append("no round completed after it before the drill ended")
            if fault.kind == "server-file" and fault.submission is not None:
                fault.logs += [(str(self.topo.workdir / f"submit-{i}.log"), 0)
                               for i in range(fault.submission + 1, len(self.submissions))]
            window = [r for r in rows
                      if fault.round_before < r.get("round", 0) <= fault.round_before + 8]
            failures = [f for r in window for f in r.get("device-failures", [])]
            ours = [f for f in failures if f["node-id"] in fault.node_ids]
            if fault.kind in ("device-file", "server-file"):
                text = "".join(_read_from(Path(p), off) for p, off in fault.logs)
                text += json.dumps(failures)
                if fault.needles and any(n in text for n in fault.needles):
                    fault.named = "named"
                elif fault.kind == "server-file" or ours:
                    fault.named = "unnamed"
                else:  # superseded by the device's next save before anything read it
                    fault.named = "no effect"
            elif fault.kind == "serverapp-kill9":
                status = (self.submissions[fault.submission]
                          if fault.submission is not None
                          and fault.submission < len(self.submissions) else None)
                fault.named = ("no effect" if "pids []" in fault.detail
                               else "named" if status not in (0, None) else "unnamed")
            elif fault.kind == "disk-full":
                fault.named = ("named" if any("cannot save its state" in f["error"]
                                              for f in ours)
                               else "named" if ours else "no effect")
            elif fault.target in ("serverapp", "superlink"):
                fault.named = "named" if failures else "no effect"
            else:
                fault.named = "named" if ours else "no effect"


def _hold(pids: list[int], seconds: float) -> None:
    _signal(pids, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        _signal(pids, signal.SIGCONT)


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _damage(path: Path, how: str, rng: random.Random) -> None:
    if not path.exists():
        return
    if how == "remove":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:rng.randrange(len(data))] if data else b"")
    else:
        size = max(path.stat().st_size, 16)
        path.write_bytes(rng.randbytes(size))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _env_steps(generation: Path) -> int:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return int(json.loads((generation / "counters.json").read_text())["env_steps"])
    return 0


def _number(path: Path) -> int:
    with contextlib.suppress(ValueError):
        return int(path.name[4:])
    return -1


def _round_of(path: Path) -> int:
    return int(path.name[len("round-"):-len(".pt")])


def _newest_complete_checkpoint(run_dir: Path) -> int:
    from fedq.server.run_directory import RunDirectory  # torch: only the drill's checks need it

    return RunDirectory(run_dir).latest_round()


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def table(faults: list[Fault]) -> list[dict[str, Any]]:
    """Faults by kind: injected, survived (nothing lost), lost, named, no effect."""
    out = []
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind and f.named != "not injected"]
        named = Counter(f.named for f in mine)
        out.append({"kind": kind, "injected": len(mine),
                    "survived": sum(not f.lost for f in mine),
                    "lost": sum(bool(f.lost) for f in mine),
                    "named": named["named"], "no effect": named["no effect"],
                    "unnamed": named["unnamed"]})
    totals = {k: sum(row[k] for row in out) for k in out[0] if k != "kind"}
    return [*out, {"kind": "total", **totals}]


def print_table(rows: list[dict[str, Any]], echo: Callable[[str], None] = print) -> None:
    keys = list(rows[0])
    echo("  ".join(f"{k:>18}" if i == 0 else f"{k:>9}" for i, k in enumerate(keys)))
    for row in rows:
        echo("  ".join(f"{row[k]:>18}" if i == 0 else f"{row[k]:>9}"
                       for i, k in enumerate(keys)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fault_drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=120)
    parser.add_argument("--minutes", type=float, default=13.0,
                        help="stop injecting after this long (wall time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=150.0,
                        help="seconds to wait for a round after each fault")
    parser.add_argument("--round-timeout", type=int, default=40)
    parser.add_argument("--workdir", type=Path, help="default: a new temp dir (kept)")
    parser.add_argument("--out", type=Path,
                        default=Path("simulations/results/fault_drill/drill.json"))
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedq-drill-"))
    rng = random.Random(args.seed)
    started = time.monotonic()
    print(f"[drill] workdir {workdir}", flush=True)
    with compose_topology(workdir) as topo:
        drill = Drill(topo, workdir / "run", rng, args.settle, args.round_timeout)
        drill.start()
        try:
            while (len(drill.faults) < args.faults
                   and time.monotonic() - started < args.minutes * 60):
                time.sleep(rng.uniform(1, 4))
                fault = drill.inject(rng.choices(KINDS, weights=list(WEIGHTS.values()))[0])
                drill.check(fault, settle=fault.kind in CRASHES_SERVER)
                print(f"[drill] {len(drill.faults):3d} {fault.kind:<18} {fault.target:<12} "
                      f"{fault.detail:<40} round {fault.round_before} -> "
                      f"{drill.last_round()} lost {fault.lost or '-'}", flush=True)
            drill.wait_for_round(drill.last_round() + 1, args.settle)  # a last round
        finally:
            drill.stop()
        drill.judge_names()
    rows = table(drill.faults)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m fedq.simulations.fault_drill " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
        "seconds": round(time.monotonic() - started),
        "rounds": drill.last_round(),
        "submissions": drill.submissions,
        "table": rows,
        "faults": [{k: v for k, v in vars(f).items() if k not in ("logs",)}
                   for f in drill.faults]}, indent=1) + "\n")
    print(f"[drill] results in {args.out}", flush=True)
    return 0 if all(not f.lost for f in drill.faults) else 1


if __name__ == "__main__":
    sys.exit(main())
