"""Fault drill: inject faults at random moments into the real loopback topology, check
after each that nothing saved was lost, and print the table (faults by kind, survived,
lost, named).

The topology is the compose file's (``simulations.compose_topology``): a real
``flower-superlink`` with its ``--database``, three ``flower-supernode``s with their state
dirs and the submit service's ``fedq-submit``, as local processes (no Docker). One long run
trains tiny rounds; the drill resubmits it with ``resume=true`` right after it crashes the
ServerApp, and a watcher resubmits whenever the latest submission ends by itself. Between
faults the drill sleeps a random 1-4 s, so faults land at random moments of a round
(training, saving, aggregating, evaluating). Fault kinds, one per process kind and file:

- ``node-kill9`` / ``node-sigstop``: SIGKILL a SuperNode's whole tree (restart it after
  0-3 s) / SIGSTOP it for 2-10 s (one in five past round-timeout)
- ``superexec-kill9`` / ``superexec-sigstop``: the node's ``flower-superexec`` (Flower does
  not restart a dead one: the drill restarts the node 5-10 s later, as a supervisor would)
- ``clientapp-kill9`` / ``clientapp-sigstop``: a running ``flwr-clientapp`` (training or
  saving), stopped for 2-10 s or past round-timeout
- ``restart-mid-save``: wait for a device's new generation folder to appear, SIGKILL the
  node at once and restart it
- ``serverapp-kill9`` / ``serverapp-sigstop``: the ``flwr-serverapp`` (killed: the drill
  resumes the run)
- ``superlink-kill9`` / ``superlink-sigstop``: the SuperLink with everything it started
  (as ``docker kill`` ends its container), restarted on its port with its database, and
  the run resumed / SIGSTOP for 2-10 s
- ``disk-full``: a real full disk (as root: the run dir and each state dir are loop-mounted
  ext4 images; the drill fills one with a file for 15-45 s: ENOSPC); not as root, a device's
  ClientApps get RLIMIT_FSIZE 4 KiB instead (EFBIG)
- ``device-file``: truncate / garbage / remove one of a device's CURRENT, MANIFEST.json,
  replay_buffer.npz, learner.pt, counters.json (of its current generation)
- ``server-file``: truncate / garbage / remove checkpoints/LATEST, the newest checkpoint or
  its digest, metrics.jsonl (or tear its last line), clients.jsonl or config.json; then
  SIGKILL the ServerApp so that the resume has to deal with it. Where the resume refuses
  by rule (metrics.jsonl or config.json unreadable), the drill restores the file once the
  refusal is logged, as an operator would, so the drill goes on.
- ``ledger-file``: truncate / garbage / remove the DP device's (``supernode-1``) privacy
  ledger ``privacy.json`` in its current generation; the device must refuse to train
  rather than fall back and forget budget; once the refusal is logged the drill restores
  the file (an operator restoring a backup), so the drill goes on
- ``residual-file``: truncate / garbage / remove ``update_residual.npz`` (int8 update
  compression's error-feedback residual) in a non-DP device's current generation
- ``privacy-log`` / ``status-file``: truncate / garbage / remove (or tear the last line
  of) the server's ``privacy.jsonl`` / damage ``status.json`` (written when a run ends:
  absent, it is created as garbage), then SIGKILL the ServerApp
- ``checkpoint-mid-save``: wait for a checkpoint temp file (``checkpoints/*.tmp``) to
  appear, SIGKILL the ServerApp at once; the drill resumes the run
  The first three need DP on one device and ``update-compression = int8``: a drill whose
  ``kinds`` include one of them runs so (``PRIVATE_KINDS``).

After each fault it checks:

- **lost**: ``metrics.jsonl`` holds rounds 1..N exactly once; every row ever seen is still
  in it or in ``metrics.superseded.jsonl`` (rows the drill itself cut off metrics.jsonl do
  not count); each device's newest complete generation has at least the env steps of the
  newest one the drill did not damage; the newest complete checkpoint is no older than
  the newest one the drill did not damage; the run completed a round after the fault
  (judged when the drill ends); the DP device's epsilon never falls from one
  ``privacy.jsonl`` row to the next; every ``privacy.jsonl`` row seen is still in it or in
  ``privacy.superseded.jsonl`` (rows the drill itself destroyed do not count).
- **named**: the fault shows under its name: a device failure with that node's id (or the
  error text "cannot save its state"), the damaged file's name (or its generation's) in the
  device's or server's log, "No space left on device" in a log, the killed submission
  exiting non-zero. A fault with no visible effect (a SIGSTOP that ended before anyone
  waited, a file superseded by a save before anyone read it, a full disk nobody wrote to)
  counts as "no effect" rather than unnamed.
- **orphans**: a ``flwr-clientapp`` process older than ``orphan-age`` seconds (the
  round watch, client/round_watch.py, should have ended it).

A drill is one harness cell (:func:`run_drill`, :data:`FAULT_DRILL`) of one or more
sessions: a later session starts a fresh SuperLink, resumes the run and adds faults of its
own kinds (one an earlier session drew none of). The committed drills are benchmarks
(:mod:`simulations.bench_fault_drill`)::

    python -m fedq.simulations.bench fault_drill
    python -m fedq.simulations.bench fault_drill --set seed=5 --results-root runs/drills
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import re
import resource
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedq.client.round_watch import ROUND_STOPPED_ERROR_CODE
from fedq.common.state_store import (
    DEVICE_STATE_ERROR_CODE,
    MANIFEST_FILE,
    POINTER_FILE,
    generations,
)
from fedq.server.outcome import NO_REPLY_CODE, STATUS_FILE
from fedq.simulations.compose_topology import TINY_RUN, Topology, compose_topology
from fedq.simulations.flower_runtime import (
    kill_serverapp,
    node_pids,
    restart_superlink,
    signal_serverapp,
)
from fedq.simulations.harness import PRODUCT_CODE, CellKind, HarnessError

#: Fault kinds and how often each is drawn: the ones that crash the ServerApp cost a
#: resume (tens of seconds here), so they are drawn less often than device faults.
WEIGHTS = {"node-kill9": 0.8, "node-sigstop": 0.8, "superexec-kill9": 0.4,
           "superexec-sigstop": 0.5, "clientapp-kill9": 1.0, "clientapp-sigstop": 0.8,
           "restart-mid-save": 0.8, "serverapp-kill9": 0.5, "serverapp-sigstop": 0.6,
           "superlink-kill9": 0.5, "superlink-sigstop": 0.6, "disk-full": 1.2,
           "device-file": 1.8, "server-file": 1.2, "ledger-file": 1.0,
           "residual-file": 1.0, "privacy-log": 0.8, "status-file": 0.4,
           "checkpoint-mid-save": 0.8}
KINDS = tuple(WEIGHTS)
CRASHES_SERVER = ("serverapp-kill9", "server-file", "superlink-kill9", "privacy-log",
                  "status-file", "checkpoint-mid-save")
#: Kinds that need a DP device and int8 compression (their files exist only then).
PRIVATE_KINDS = ("ledger-file", "residual-file", "privacy-log")
PRIVATE_NODE = "supernode-1"  # the device that trains with DP in such a drill
LEDGER_FILE, RESIDUAL_FILE = "privacy.json", "update_residual.npz"
PRIVACY_LOG, PRIVACY_SUPERSEDED = "privacy.jsonl", "privacy.superseded.jsonl"
DEVICE_FILES = (POINTER_FILE, MANIFEST_FILE, "replay_buffer.npz", "learner.pt",
                "counters.json")
SERVER_FILES = ("LATEST", "checkpoint", "digest", "metrics.jsonl", "clients.jsonl",
                "config.json")
DAMAGE = ("truncate", "garbage", "remove")
RUN = {**TINY_RUN, "local-steps": 100, "num-server-rounds": 100_000,
       "min-available-clients": 2, "eval-episodes": 1}
DISK_MIB = {"run": 64, "device": 32}  # sizes of the loop-mounted images
NO_SPACE = ("No space left on device", "Errno 28", "cannot save its state")
FILLER = ".drill-filler"


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
    named: str = "unnamed"  # named | no effect | unnamed | not injected
    progressed: bool = False
    slow: bool = False  # the resumed run needed longer than settle for a round
    session: int = 0  # which of the drill's sessions injected it


class Drill:
    """The topology, the run, what has been seen, and the faults so far."""

    def __init__(self, topo: Topology, run_dir: Path, rng: random.Random, settle: float,
                 round_timeout: int, *, disks: dict[str, Path] | None = None,
                 resume: bool = False, session: int = 0, orphan_age: float = 300.0,
                 private: bool = False) -> None:
        self.topo, self.run_dir, self.rng, self.settle = topo, run_dir, rng, settle
        self.overrides = {**RUN, "round-timeout": round_timeout}
        self.private = private  # DP on PRIVATE_NODE (its node config), int8 updates
        if private:
            self.overrides["update-compression"] = "int8"
        self.privacy_seen = {_privacy_key(r) for r in _privacy_rows(run_dir / PRIVACY_LOG)}
        self.disks = disks or {}  # "run" / node name -> loop-mounted directory
        self.resume, self.session, self.orphan_age = resume, session, orphan_age
        self.faults: list[Fault] = []
        rows = self.rows()
        self.seen_rows: set[tuple[int, float]] = {(r["round"], r.get("round-seconds"))
                                                  for r in rows}
        self.device_floor = {name: _newest_steps(state)
                             for name, state in topo.state_dirs.items()}
        self.checkpoint_floor = _newest_complete_checkpoint(run_dir) if resume else 0
        self.submissions: list[int | None] = []  # exit status of each submission
        self.orphans: dict[int, dict[str, Any]] = {}  # pid -> what was seen
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # --- the run -------------------------------------------------------------------------
    def _submit(self) -> None:
        """Start a submission of the run (resume after the first) in its own thread."""
        index = len(self.submissions)
        self.submissions.append(None)
        overrides = {**self.overrides, "resume": index > 0 or self.resume}

        def run() -> None:
            self.submissions[index] = self.topo.submit(
                self.run_dir, overrides, log_name=f"submit-s{self.session}-{index}.log",
                timeout=3600)

        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _submit_log(self, index: int) -> Path:
        return self.topo.workdir / f"submit-s{self.session}-{index}.log"

    def _watch(self) -> None:
        """Resubmit when the latest submission ended by itself (e.g. its ServerApp was
        declared dead during a SIGSTOP, or its resume was refused)."""
        while not self._stop.wait(2.0):
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
        if not self.wait_for_round(self.last_round() + 1, timeout=600):
            raise RuntimeError(f"no round finished; see {self.topo.workdir}")

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
                      submission=len(self.submissions) - 1, session=self.session)
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

    def _stop_seconds(self) -> float:
        """2-10 s, or (one in five) past round-timeout: the reply expires meanwhile."""
        if self.rng.random() < 0.2:
            return self.overrides["round-timeout"] + self.rng.uniform(2, 10)
        return self.rng.uniform(2, 10)

    def _node_kill9(self, fault: Fault, name: str) -> None:
        self.topo.nodes[name].stop(kill=True)
        time.sleep(self.rng.uniform(0, 3))
        self._restart(name)

    def _node_sigstop(self, fault: Fault, name: str) -> None:
        seconds = self._stop_seconds()
        fault.detail = f"{seconds:.1f}s"
        _hold(node_pids(self.topo.nodes[name]), seconds)

    def _superexec_kill9(self, fault: Fault, name: str) -> None:
        pids = self._running(name, "flower-superexec")
        if not pids:
            fault.detail = "not injected: no superexec ran within 10s"
            return
        _signal(pids, signal.SIGKILL)
        seconds = self.rng.uniform(5, 10)
        fault.detail = f"pids {pids}, node restarted after {seconds:.1f}s"
        time.sleep(seconds)  # Flower does not start a new SuperExec: a supervisor must
        self.topo.nodes[name].stop(kill=True)
        self._restart(name)

    def _superexec_sigstop(self, fault: Fault, name: str) -> None:
        self._hold_program(fault, name, "flower-superexec", "superexec")

    def _hold_program(self, fault: Fault, name: str, program: str, label: str) -> None:
        """SIGSTOP the node's ``program`` processes for a while, then SIGCONT them."""
        pids = self._running(name, program)
        if not pids:
            fault.detail = f"not injected: no {label} ran within 10s"
            return
        seconds = self._stop_seconds()
        fault.detail = f"pids {pids} {seconds:.1f}s"
        _hold(pids, seconds)

    def _running(self, name: str, program: str, wait: float = 10.0) -> list[int]:
        """The node's processes running ``program``, waiting up to ``wait`` s for one."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if pids := node_pids(self.topo.nodes[name], program):
                return pids
            time.sleep(0.05)
        return []

    def _clientapp_kill9(self, fault: Fault, name: str) -> None:
        pids = self._running(name, "flwr-clientapp")
        _signal(pids, signal.SIGKILL)
        fault.detail = f"pids {pids}" if pids else "not injected: no clientapp ran within 10s"

    def _clientapp_sigstop(self, fault: Fault, name: str) -> None:
        self._hold_program(fault, name, "flwr-clientapp", "clientapp")

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

    def _superlink_kill9(self, fault: Fault, name: str) -> None:
        """Kill the SuperLink's tree (its ServerApp too, as a container kill would), start
        it again with its database; the watcher resubmits the run with resume."""
        fault.target = "superlink"
        self._server_logs(fault)
        clientapps = {n: node_pids(node, "flwr-clientapp")
                      for n, node in self.topo.nodes.items()}
        restart_superlink(self.topo.link, kill=True)
        fault.detail = f"restarted; clientapps running at the kill {clientapps}"

    def _superlink_sigstop(self, fault: Fault, name: str) -> None:
        fault.target = "superlink"
        seconds = self.rng.uniform(2, 10)
        fault.detail = f"{seconds:.1f}s"
        _hold([self.topo.link.process.pid], seconds)

    def _disk_full(self, fault: Fault, name: str) -> None:
        if not self.disks:
            self._disk_full_rlimit(fault, name)
            return
        target = "run" if self.rng.random() < 0.3 else name
        fault.target = "server" if target == "run" else name
        seconds = self.rng.uniform(25, 45) if target == "run" else self.rng.uniform(15, 35)
        fault.needles = list(NO_SPACE)
        if target == "run":
            self._server_logs(fault)
        else:
            self._node_log(fault, name)
        with fill_disk(self.disks[target]) as filled:
            fault.detail = f"{self.disks[target].name} full ({filled} bytes filler) {seconds:.1f}s"
            time.sleep(seconds)

    def _disk_full_rlimit(self, fault: Fault, name: str) -> None:
        """Not root: a device's ClientApps get RLIMIT_FSIZE 4 KiB (EFBIG) instead."""
        seconds = self.rng.uniform(5, 20)
        fault.detail = f"RLIMIT_FSIZE {seconds:.1f}s"
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
        which = self.rng.choice([w for w in SERVER_FILES
                                 if newest or w not in ("checkpoint", "digest")])
        how = self.rng.choice([*DAMAGE, "tear"] if which == "metrics.jsonl" else DAMAGE)
        backup: tuple[Path, bytes] | None = None
        if which in ("metrics.jsonl", "clients.jsonl", "config.json"):
            path = self.run_dir / which
            fault.needles = [which, "cannot resume"]
            if which == "metrics.jsonl":
                fault.needles.append("metrics.superseded.jsonl")
            if path.exists():
                backup = (path, path.read_bytes())
        else:
            path = {"LATEST": checkpoints / "LATEST", "checkpoint": newest[-1],
                    "digest": newest[-1].with_name(newest[-1].name + ".sha256")}[which]
            if which in ("checkpoint", "digest"):
                self.checkpoint_floor = max(0, _round_of(newest[-2]) if len(newest) > 1
                                            else 0)
            fault.needles = [path.name.replace(".sha256", ""), "checkpoints/LATEST"]
        fault.detail = f"{how} {path.name}"
        if how == "tear":
            with open(path, "a") as fh:
                fh.write('{"round": ')  # a crash in the middle of an append
        else:
            _damage(path, how, self.rng)
        if which == "metrics.jsonl":  # rows the drill cut off are the drill's loss
            intact = self.rows()
            last = intact[-1]["round"] if intact else 0
            self.seen_rows = {r for r in self.seen_rows if r[0] <= last}
            self.checkpoint_floor = min(self.checkpoint_floor, last)
        if self._crash_server(fault) and backup is not None:
            self._restore_after_refusal(fault, *backup)

    def _ledger_file(self, fault: Fault, name: str) -> None:
        if not self.private:
            fault.detail = "not injected: no DP device in this drill"
            return
        backup = self._damage_generation_file(fault, PRIVATE_NODE, LEDGER_FILE)
        if backup is not None:
            self._restore_after_device_refusal(fault, *backup)

    def _residual_file(self, fault: Fault, name: str) -> None:
        plain = sorted(n for n in self.topo.nodes if n != PRIVATE_NODE or not self.private)
        self._damage_generation_file(fault, self.rng.choice(plain), RESIDUAL_FILE)

    def _damage_generation_file(self, fault: Fault, name: str, which: str
                                ) -> tuple[Path, bytes] | None:
        """Damage ``which`` in the device's current complete generation; return its old
        bytes (None if not injected). The generation no longer counts for the floor."""
        fault.target = name
        state = self.topo.state_dirs[name]
        self._node_log(fault, name)
        complete = [g for g in generations(state) if g.problem is None]
        if not complete or not (complete[0].path / which).exists():
            fault.detail = f"not injected: no complete generation holding {which}"
            return None
        path = complete[0].path / which
        spare = complete[1] if len(complete) > 1 else None
        self.device_floor[name] = _env_steps(spare.path) if spare else 0
        how = self.rng.choice(DAMAGE)
        backup = (path, path.read_bytes())
        fault.needles = [path.name, path.parent.name]
        fault.detail = f"{how} {path.relative_to(state)}"
        _damage(path, how, self.rng)
        return backup

    def _restore_after_device_refusal(self, fault: Fault, path: Path, data: bytes) -> None:
        """A DP device refuses a damaged ledger for good: restore it once the refusal is
        logged (or the device saved past it), as its operator would from a backup.

        Only a refusal that names this generation counts, and only in rounds after the
        fault: an earlier ledger fault's refusal, still in the recent rows, once made the
        drill restore the file before the device had read it."""
        log, offset = fault.logs[-1]
        refusal = f"{path.parent.name} is damaged"
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline:
            errors = [f.get("error", "") for r in self.rows()[-8:]
                      if r.get("round", 0) > fault.round_before
                      for f in r.get("device-failures", [])]
            if refused_by_name([*_read_from(Path(log), offset).splitlines(), *errors],
                               refusal):
                path.write_bytes(data)
                fault.detail += f"; refused by name, {path.name} restored"
                return
            newest = generations(path.parent.parent)
            if newest and newest[0].number > _number(path.parent) and newest[0].problem is None:
                path.write_bytes(data)
                fault.detail += f"; superseded by {newest[0].path.name}, restored"
                return
            time.sleep(0.5)
        path.write_bytes(data)
        fault.detail += f"; no refusal within {self.settle:.0f}s, restored"

    def _privacy_log(self, fault: Fault, name: str) -> None:
        fault.target = "server"
        self._server_logs(fault)
        path = self.run_dir / PRIVACY_LOG
        if not path.exists():
            fault.detail = f"not injected: no {PRIVACY_LOG} yet"
            return
        how = self.rng.choice([*DAMAGE, "tear"])
        fault.needles = [PRIVACY_LOG, PRIVACY_SUPERSEDED]
        fault.detail = f"{how} {PRIVACY_LOG}"
        if how == "tear":
            with open(path, "a") as fh:
                fh.write('{"round": ')  # a crash in the middle of an append
        else:
            _damage(path, how, self.rng)
            # rows the drill destroyed are the drill's loss, not the product's
            self.privacy_seen = {_privacy_key(r) for r in _privacy_rows(path)} | {
                _privacy_key(r) for r in _privacy_rows(self.run_dir / PRIVACY_SUPERSEDED)}
        self._crash_server(fault)

    def _status_file(self, fault: Fault, name: str) -> None:
        fault.target = "server"
        self._server_logs(fault)
        path = self.run_dir / STATUS_FILE
        fault.needles = [STATUS_FILE]
        if path.exists():
            how = self.rng.choice(DAMAGE)
            _damage(path, how, self.rng)
        else:  # written when a run ends; a stale garbage file in its place
            how = "garbage (was absent)"
            path.write_bytes(self.rng.randbytes(64))
        fault.detail = f"{how} {STATUS_FILE}"
        self._crash_server(fault)

    def _checkpoint_mid_save(self, fault: Fault, name: str) -> None:
        """SIGKILL the ServerApp while a checkpoint (or its digest, or LATEST) is being
        written: the moment its temp file exists."""
        fault.target = "serverapp"
        checkpoints = self.run_dir / "checkpoints"
        before = {p.name for p in checkpoints.glob("*.tmp")}  # stale ones of earlier kills
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                fresh = [e.name for e in os.scandir(checkpoints)
                         if e.name.endswith(".tmp") and e.name not in before]
                if fresh:
                    fault.detail = f"killed while {fresh[0]} was being written"
                    break
            time.sleep(0.001)
        else:
            fault.detail = "no checkpoint save seen within 60s; killed anyway"
        self._crash_server(fault)

    def _restore_after_refusal(self, fault: Fault, path: Path, data: bytes) -> None:
        """A resume refused by rule stops the run for good: restore the file once the
        refusal is logged (an operator's part), so the drill goes on."""
        first = len(self.submissions) - 1
        deadline = time.monotonic() + self.settle
        while time.monotonic() < deadline:
            text = "".join(_read_from(self._submit_log(i), 0)
                           for i in range(first, len(self.submissions)))
            if "cannot resume" in text:
                path.write_bytes(data)
                fault.detail += f"; refused by name, {path.name} restored"
                return
            if self.last_round() > fault.round_before:
                return  # resumed without refusing
            time.sleep(1.0)

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
            steps = _newest_steps(state)
            if steps < self.device_floor[name]:
                fault.lost.append(f"{name}: newest complete generation has {steps} env "
                                  f"steps, below {self.device_floor[name]}")
            self.device_floor[name] = max(self.device_floor[name], steps)
        ckpt = _newest_complete_checkpoint(self.run_dir)
        if ckpt < self.checkpoint_floor:
            fault.lost.append(f"newest complete checkpoint {ckpt} < {self.checkpoint_floor}")
        self.checkpoint_floor = max(self.checkpoint_floor, ckpt)
        fault.lost += self._privacy_lost()
        self.find_orphans()

    def _privacy_lost(self) -> list[str]:
        """The DP device's epsilon never goes back; no privacy.jsonl row disappears."""
        lost = []
        rows = _privacy_rows(self.run_dir / PRIVACY_LOG)
        kept = {_privacy_key(r) for r in rows + _privacy_rows(self.run_dir / PRIVACY_SUPERSEDED)}
        if missing := self.privacy_seen - kept:
            lost.append(f"privacy.jsonl rows gone: {sorted(missing)[:3]}")
        self.privacy_seen |= {_privacy_key(r) for r in rows}
        if self.private:
            ids = set(self._all_node_ids(PRIVATE_NODE))
            eps = [float(r["dp-epsilon"]) for r in rows if r.get("node-id") in ids
                   and r.get("status") == "trained" and r.get("dp-epsilon") is not None]
            # in round order (a resume moves the rows of rounds it repeats aside)
            if falls := [(a, b) for a, b in itertools.pairwise(eps) if b < a - 1e-9]:
                lost.append(f"{PRIVATE_NODE}: epsilon fell from {falls[0][0]} to "
                            f"{falls[0][1]} in {PRIVACY_LOG}")
        return lost

    def find_orphans(self) -> None:
        """Record every ``flwr-clientapp`` older than ``orphan_age`` seconds."""
        for name, node in self.topo.nodes.items():
            for pid in node_pids(node, "flwr-clientapp"):
                age = _age(pid)
                if age is not None and age > self.orphan_age:
                    self.orphans[pid] = {"node": name, "age-s": round(age)}

    def judge_names(self) -> None:
        """After the drill (logs complete): was each fault of this session named?"""
        rows = self.rows() + _jsonl(self.run_dir / "metrics.superseded.jsonl")
        final = self.last_round()
        ids = {name: self._all_node_ids(name) for name in self.topo.nodes}
        for fault in self.faults:
            judge(fault, rows, final, ids, self)


def judge(fault: Fault, rows: list[dict[str, Any]], final: int, ids: dict[str, list[int]],
          drill: Drill) -> None:
    """Set ``fault.named`` and its progress (module docstring)."""
    if fault.detail.startswith("not injected"):
        fault.named = "not injected"
        return
    if fault.target in ids:
        fault.node_ids = ids[fault.target]
    fault.progressed = final > fault.round_before
    if not fault.progressed:
        fault.lost.append("no round completed after it before the drill ended")
    if fault.target == "server" and fault.submission is not None:
        fault.logs += [(str(drill._submit_log(i)), 0)
                       for i in range(fault.submission + 1, len(drill.submissions))]
    window = [r for r in rows if fault.round_before < r.get("round", 0) <= fault.round_before + 8]
    failures = [f for r in window for f in r.get("device-failures", [])]
    ours = [f for f in failures if f["node-id"] in fault.node_ids]
    text = "".join(_read_from(Path(p), off) for p, off in fault.logs) + json.dumps(failures)
    status = (drill.submissions[fault.submission]
              if fault.submission is not None and fault.submission < len(drill.submissions)
              else None)
    if fault.kind in ("device-file", "server-file", "ledger-file", "residual-file",
                      "privacy-log", "status-file"):
        if fault.needles and any(n in text for n in fault.needles):
            fault.named = "named"
        elif fault.kind == "status-file":  # derived, read by nobody while a run goes on
            fault.named = "no effect"
        elif fault.kind in ("server-file", "privacy-log") or ours:
            fault.named = "unnamed"
        else:  # superseded by the device's next save before anything read it
            fault.named = "no effect"
    elif fault.kind == "disk-full":
        # its own logs and its own node's failures: the window's other failures (other
        # devices', other faults') do not name it
        text = "".join(_read_from(Path(p), off) for p, off in fault.logs)
        text += json.dumps(ours)
        if any(n in text for n in fault.needles):
            fault.named = "named"
        elif [f for f in ours if not other_fault(f)]:
            fault.named = "unnamed"
        else:  # nobody wrote to the full disk while it was full (a failed write in Python
            fault.named = "no effect"  # says "[Errno 28] No space left on device")
    elif fault.kind in ("serverapp-kill9", "checkpoint-mid-save"):
        fault.named = ("no effect" if "pids []" in fault.detail
                       else "named" if status not in (0, None) else "unnamed")
    elif fault.kind == "superlink-kill9":
        fault.named = "named" if status not in (0, None) or failures else "unnamed"
    elif fault.target in ("serverapp", "superlink"):
        fault.named = "named" if failures else "no effect"
    else:
        fault.named = "named" if ours else "no effect"


def refused_by_name(lines: list[str], refusal: str) -> bool:
    """Whether one of ``lines`` (log lines, failures' errors) is a device's refusal to
    train whose reason is ``refusal`` (``gen-000026 is damaged``)."""
    return any(refusal in line and "refuses to train" in line for line in lines)


def other_fault(failure: dict[str, Any]) -> bool:
    """A device failure that a full disk does not cause: no reply, a node Flower gave up
    on, a state refused at load, a round the round watch stopped (other faults' effects
    in the same rounds)."""
    return (failure.get("code") in (NO_REPLY_CODE, DEVICE_STATE_ERROR_CODE,
                                    ROUND_STOPPED_ERROR_CODE)
            and "No space left" not in failure.get("error", "")
            and "cannot save its state" not in failure.get("error", "")
            ) or "Node Unavailable" in failure.get("error", "")


@contextlib.contextmanager
def fill_disk(directory: Path) -> Iterator[int]:
    """Fill the file system of ``directory`` to the last block (a file of zeros written
    until ENOSPC), yield the bytes written, then remove the file."""
    path = directory / FILLER
    written = 0
    try:
        with open(path, "wb", buffering=0) as fh:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
                block = bytes(chunk)
                while True:
                    try:
                        written += fh.write(block)
                    except OSError as err:
                        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        break
        yield written
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def loop_disks(workdir: Path, targets: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Mount a small ext4 image (kept in ``workdir/disks``) on each target directory, so
    that filling it is a real full disk; unmount on exit. Root only."""
    images = workdir / "disks"
    images.mkdir(parents=True, exist_ok=True)
    mounted: list[Path] = []
    try:
        for name, target in targets.items():
            image = images / f"{name}.img"
            if not image.exists():
                with open(image, "wb") as fh:
                    fh.truncate(DISK_MIB["run" if name == "run" else "device"] << 20)
                subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
            target.mkdir(parents=True, exist_ok=True)
            if any(target.iterdir()):
                raise RuntimeError(f"{target} is not empty: cannot mount a disk over it")
            subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)
            mounted.append(target)
            target.chmod(0o700 if name != "run" else 0o755)
        yield dict(targets)
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


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
            with contextlib.suppress(ValueError, RecursionError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("round"), int):
                    rows.append(row)
    return rows


def _privacy_rows(path: Path) -> list[dict[str, Any]]:
    return [r for r in _jsonl(path) if "node-id" in r]


def _privacy_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """A privacy.jsonl row's identity (a superseded copy adds only its time)."""
    return (row["round"], row.get("node-id"), row.get("status"), row.get("dp-epsilon"),
            row.get("dp-steps-total"))


def _env_steps(generation: Path) -> int:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return int(json.loads((generation / "counters.json").read_text())["env_steps"])
    return 0


def _newest_steps(state: Path) -> int:
    complete = [g for g in generations(state) if g.problem is None]
    return _env_steps(complete[0].path) if complete else 0


def _number(path: Path) -> int:
    with contextlib.suppress(ValueError):
        return int(path.name[4:])
    return -1


def _round_of(path: Path) -> int:
    return int(path.name[len("round-"):-len(".pt")])


def _newest_complete_checkpoint(run_dir: Path) -> int:
    from fedq.server.run_directory import RunDirectory  # torch: only the drill's checks need it

    return RunDirectory(run_dir).latest_round()


def _age(pid: int) -> float | None:
    """Seconds since ``pid`` started, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


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


def drill_sessions(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A drill's sessions (``faults`` in all so far, ``minutes`` of injection, ``kinds``
    drawn from), checked before anything starts; a bad one fails naming the parameter."""
    sessions = params["sessions"]
    if not isinstance(sessions, list) or not sessions:
        raise HarnessError(f"sessions: a non-empty list of {{faults, minutes, kinds}}, got "
                         f"{sessions!r}")
    out, total = [], 0
    for i, session in enumerate(sessions):
        if not isinstance(session, Mapping) or set(session) != {"faults", "minutes", "kinds"}:
            raise HarnessError(f"sessions[{i}]: needs exactly faults, minutes, kinds; got "
                             f"{session!r}")
        kinds = [k.strip() for k in str(session["kinds"]).split(",") if k.strip()]
        if kinds == ["all"]:
            kinds = list(KINDS)
        if unknown := sorted(set(kinds) - set(KINDS)) or not kinds:
            raise HarnessError(f"sessions[{i}].kinds: unknown {unknown or session['kinds']!r}; "
                             f"known: {', '.join(KINDS)} (or 'all')")
        if session["faults"] <= total or session["minutes"] <= 0:
            raise HarnessError(f"sessions[{i}]: faults ({session['faults']}) must exceed the "
                             f"earlier sessions' ({total}) and minutes must be > 0")
        total = session["faults"]
        out.append({"faults": session["faults"], "minutes": float(session["minutes"]),
                    "kinds": kinds})
    return out


def run_drill(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One drill, a harness cell: its sessions in turn on one run in ``workdir``. Each
    session starts a fresh SuperLink (its database new) and resumes the run, then injects
    faults drawn from its ``kinds`` until the drill has ``faults`` in all or ``minutes``
    have passed; a later session adds kinds an earlier one drew none of. A drill whose
    kinds include a :data:`PRIVATE_KINDS` one runs DP on :data:`PRIVATE_NODE` and int8
    updates in every session. ``real-disk``: loop-mounted ext4 images for full disks (as
    root), else the RLIMIT_FSIZE stand-in.

    SIGTERM or SIGINT stops the injection, tears the topology down (no process left
    behind) and raises, so an interrupted drill is never cached as a finished one."""
    sessions = drill_sessions(params)
    workdir = workdir.resolve()
    real_disk = os.geteuid() == 0 and bool(params["real-disk"])
    private = any(set(s["kinds"]) & set(PRIVATE_KINDS) for s in sessions)
    finish = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: finish.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    faults: list[Fault] = []
    records: list[dict[str, Any]] = []
    rounds = 0
    try:
        for index, session in enumerate(sessions):
            if finish.is_set():
                break
            rounds, record = _run_session(workdir, params, session, index, faults, finish,
                                          real_disk=real_disk, private=private)
            records.append(record)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if finish.is_set():
        raise HarnessError(f"fault drill stopped by a signal after {len(faults)} faults; "
                           f"its run is in {workdir}, its result not kept")
    return {"sessions": records, "rounds": rounds,
            "orphans": sum(len(r["orphans"]) for r in records), "table": table(faults),
            "faults": [{k: v for k, v in vars(f).items() if k != "logs"} for f in faults]}


def _run_session(workdir: Path, params: Mapping[str, Any], session: dict[str, Any],
                 index: int, faults: list[Fault], finish: threading.Event, *,
                 real_disk: bool, private: bool) -> tuple[int, dict[str, Any]]:
    """One session of :func:`run_drill`; appends its faults to ``faults``."""
    rng = random.Random(params["seed"] + 1000 * index)
    started = time.monotonic()
    earlier = len(faults)
    print(f"[drill] workdir {workdir}; session {index}; {earlier} earlier faults; full "
          f"disk: {'loop-mounted ext4' if real_disk else 'RLIMIT_FSIZE stand-in'}", flush=True)
    database = workdir / "link" / "state.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    database.unlink(missing_ok=True)  # a fresh SuperLink per session; the run dir persists
    run_dir = workdir / "run"
    kinds = session["kinds"]
    with contextlib.ExitStack() as stack:
        disks: dict[str, Path] = {}
        if real_disk:
            disks = stack.enter_context(loop_disks(workdir, {
                "run": run_dir, **compose_state_dirs(workdir)}))
        topo = stack.enter_context(compose_topology(
            workdir, database=database,
            node_extras={PRIVATE_NODE: {"dp-enabled": True}} if private else None))
        if disks and {n: disks[n] for n in topo.state_dirs} != topo.state_dirs:
            raise RuntimeError("the topology's state dirs are not the mounted ones")
        drill = Drill(topo, run_dir, rng, params["settle"], params["round-timeout"],
                      disks=disks, resume=index > 0, session=index,
                      orphan_age=params["orphan-age"], private=private)
        drill.start()
        try:
            while (earlier + len(drill.faults) < session["faults"] and not finish.is_set()
                   and time.monotonic() - started < session["minutes"] * 60):
                time.sleep(rng.uniform(1, 4))
                fault = drill.inject(rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0])
                drill.check(fault, settle=fault.kind in CRASHES_SERVER)
                print(f"[drill] {earlier + len(drill.faults):3d} {fault.kind:<18} "
                      f"{fault.target:<12} {fault.detail[:60]:<60} round {fault.round_before}"
                      f" -> {drill.last_round()} lost {fault.lost or '-'}", flush=True)
            if not finish.is_set():
                drill.wait_for_round(drill.last_round() + 1, params["settle"])  # a last round
            drill.find_orphans()
        finally:
            drill.stop()
        drill.judge_names()
        rounds = drill.last_round()  # before the run dir's disk is unmounted
    faults.extend(drill.faults)
    return rounds, {
        "faults": len(drill.faults), "kinds": kinds,
        "seconds": round(time.monotonic() - started), "rounds-at-end": rounds,
        "submissions": drill.submissions,
        "full-disk": "loop-mounted ext4" if real_disk else "RLIMIT_FSIZE",
        "private": f"dp-enabled on {PRIVATE_NODE}, update-compression int8" if private
                   else "no DP, no compression",
        "orphans": list(drill.orphans.values())}


def compose_state_dirs(workdir: Path) -> dict[str, Path]:
    """Each SuperNode service's state dir, where :func:`compose_topology` puts it."""
    from fedq.simulations.compose_topology import load_compose, node_config, supernode_services

    return {name: workdir / "devices" / Path(node_config(service)["state-dir"]).name
            for name, service in supernode_services(load_compose()).items()}


FAULT_DRILL = CellKind("fault-drill", run_drill, (
    *PRODUCT_CODE, "fedq.simulations.fault_drill", "fedq.simulations.compose_topology",
    "fedq.simulations.flower_runtime"))
