"""A deployed round on loopback: where the time goes, what each device sends, its memory.

The docker-compose.yml federation as local processes (:mod:`simulations.compose_topology`):
a SuperLink, its three CartPole SuperNodes with their node configs, the run submitted
with the submit service's command line and run config (``local-steps`` 2000, ...), for
``rounds`` rounds. Per round (round 1, the warm-up that installs the app and fills no
buffer yet, reported apart; the median over the others):

* **local training**: the slowest device's ``train-seconds`` (its env steps and DQN
  updates), since the round waits for it;
* **everything else**: the round's wall time minus that: starting a ClientApp process
  per message (Python + torch imports), loading/saving the device state, moving the
  weights through the SuperLink, collecting the replies (50-100 ms polling:
  server/prompt_grid.py), aggregation, federated evaluation, metrics and checkpoint.

It runs one federation per learner backend (``backends``, torch and numpy): the torch
backend's ClientApp processes import torch (and opacus with DP), the numpy backend's
import neither, so the two show what a device's imports cost per round. Each runs as the
compose file deploys it (``round-protocol = "fused"``: one message per device and round;
``fedq-supernode``: 0.2 s polling and the warm executor, one fork server per device
whose forked child runs each message with the imports already done); the ``baseline``
setup runs each backend the way a round was deployed before (``train-then-evaluate``: a
train and an evaluate message per device and round, Flower's ``flower-supernode``: 3 s
polling), in the same benchmark run.

Where the rest of a round goes, from per-phase timestamps: the sampler also records when
each device's ``flwr-clientapp`` processes (one per message) start and end (50 ms
resolution). Per round, for the device that trained longest: *ClientApp processes* is
the wall time its message processes lived (Python start, imports, Flower's message I/O,
the handlers), *handler* the time fedq's train handler ran (``handler-seconds``: device
state load and save around the training), *training* its ``train-seconds``; *outside
the device* is the rest of the round (waiting for a poll, the SuperLink, the ServerApp's
aggregation, metrics and checkpoint). A round's messages: fused, the train message (which
evaluates the previous round's model first; the last round also has its evaluate
message); train-then-evaluate, its train and its evaluate message.

Bytes sent per device and round: the serialized train reply (weights + metrics, every
object of Flower's message tree) measured by the ClientApp's message-audit mod as the
message leaves, next to the raw fp32 weight bytes the server counted.
Memory: each device's process tree (the SuperNode; with Flower's SuperExec, it and the
``flwr-clientapp`` process of the moment; with ``fedq-supernode``'s warm executor
(client/warm_executor.py), its fork server, task loop and the forked ``fedq-clientapp``
child of the moment), sampled every 50 ms: the peak RSS of each kind of process, the
peak of the tree's summed RSS, and (every 0.2 s) the peak of the tree's summed PSS
(``/proc/PID/smaps_rollup``). Forked processes share their parent's pages copy-on-write
and RSS counts a shared page in every process that maps it, so the summed RSS
overcounts a forked tree; PSS splits each shared page among its sharers and sums to the
memory the device really uses.

The ``per-tensor`` setup runs each backend fused with ``flat-wire = false`` (each
message's weights one array per tensor, 16 Flower objects, as before
:mod:`common.flat_wire`), the A/B of the flat wire format in one benchmark run;
``hidden-sizes`` changes the Q-network, so the bytes per message change while the
object count does not.

One cell per (backend, setup, repeat): one federation, its processes started and stopped
inside the cell, cells one at a time (a timing benchmark). The variants registered below
are the committed result folders (``deployment``, ``deployment_repeats``, ...):

    python -m fedq.simulations.bench deployment
    python -m fedq.simulations.bench deployment_quiet
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.client.warm_executor import FORK_SERVER_NAME, TASK_LOOP_NAME, TASK_NAME
from fedq.common import hop_trace
from fedq.simulations import hop_breakdown
from fedq.simulations.compose_topology import (
    COMPOSE,
    compose_topology,
    load_compose,
    submit_overrides,
)
from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    HarnessError,
    Summary,
    name_list,
    register_benchmark,
)
from fedq.simulations.results_io import markdown_table


class MemorySampler:
    """Peak RSS of each SuperNode's process tree, sampled in a background thread."""

    def __init__(self, roots: dict[str, int], period: float = 0.05) -> None:
        self.roots = roots
        self.period = period
        self.peak_total: dict[str, int] = defaultdict(int)
        # proportional set size of the whole tree: pages shared by forked processes (the
        # warm executor's children) count once, split among them
        self.peak_pss_total: dict[str, int] = defaultdict(int)
        self._samples = 0
        self.peak_by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        # per device: each flwr-clientapp process's (first seen, last seen), monotonic s
        self.clientapps: dict[str, dict[int, list[float]]] = defaultdict(dict)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            children = _children()
            with_pss = self._samples % PSS_EVERY == 0  # smaps_rollup walks page tables
            self._samples += 1
            for name, root in self.roots.items():
                total = pss = 0
                for pid in _tree(root, children):
                    rss, kind = _rss_kb(pid), _kind(pid)
                    total += rss
                    if with_pss:
                        pss += _pss_kb(pid)
                    if kind in CLIENTAPP_KINDS:
                        now = time.monotonic()
                        self.clientapps[name].setdefault(pid, [now, now])[1] = now
                    by_kind = self.peak_by_kind[name]
                    by_kind[kind] = max(by_kind[kind], rss)
                self.peak_total[name] = max(self.peak_total[name], total)
                self.peak_pss_total[name] = max(self.peak_pss_total[name], pss)
            time.sleep(self.period)


def _children() -> dict[int, list[int]]:
    table: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(stat[stat.rindex(")") + 2:].split()[1])].append(int(entry))
    return table


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    found, stack = [root], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _kind(pid: int) -> str:
    try:  # the warm executor's forks share the SuperNode's command line; their comm differs
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    if comm in WARM_KINDS:
        return comm
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    names = [Path(a.decode(errors="replace")).name for a in argv[:2]]
    if "fedq-supernode" in names:  # flower-supernode with prompt polling
        return "flower-supernode"
    for kind in ("flower-supernode", "flower-superexec", "flwr-clientapp"):
        if kind in names:
            return kind
    return names[0] if names else "unknown"


BACKENDS = ("torch", "numpy")
WARM_KINDS = (FORK_SERVER_NAME, TASK_LOOP_NAME, TASK_NAME)
CLIENTAPP_KINDS = ("flwr-clientapp", TASK_NAME)  # one process per message, either way
PROCESS_KINDS = ("flower-supernode", "flower-superexec", "flwr-clientapp", *WARM_KINDS)
PSS_EVERY = 4  # PSS sampled every 4th period (0.2 s)
# How a round is deployed: round protocol and the SuperNode program
# and whether the weights travel as one flat array (common/flat_wire.py)
SETUPS = {"fused": {"protocol": "fused", "supernode": "fedq-supernode", "flat_wire": True},
          "per-tensor": {"protocol": "fused", "supernode": "fedq-supernode",
                         "flat_wire": False},
          "baseline": {"protocol": "train-then-evaluate", "supernode": "flower-supernode",
                       "flat_wire": False}}
ROUND_COLUMNS = ["round-seconds", "local-training-seconds", "local-training-share",
                 "everything-else-seconds", "train-phase-seconds", "eval-phase-seconds",
                 "client-handler-overhead-seconds"]
PHASE_COLUMNS = ["round-seconds", "outside-device-seconds", "clientapp-process-seconds",
                 "process-outside-handler-seconds", "handler-outside-training-seconds",
                 "local-training-seconds", "local-training-share-of-process"]


def measure(workdir: Path, backend: str, rounds: int, local_steps: int | None,
            hidden_sizes: str | None, *, protocol: str, supernode: str,
            flat_wire: bool) -> dict[str, object]:
    """One compose federation whose devices all use ``backend``, deployed with
    ``protocol``, ``supernode`` and ``flat_wire``: per-round timings, reply sizes, each
    device's peak memory."""
    workdir.mkdir(parents=True)
    workdir = workdir.resolve()
    run_dir, audit_dir = workdir / "run", workdir / "audit"
    overrides = {"num-server-rounds": rounds, "backend": backend, "round-protocol": protocol,
                 "flat-wire": flat_wire}
    if local_steps:
        overrides["local-steps"] = local_steps
    if hidden_sizes:
        overrides["hidden-sizes"] = hidden_sizes
    # the audit directory is each device's own setting: a run config cannot choose it
    # the backend also in each node's config: a device names its own backend, and the
    # warm executor preloads torch only for a node whose config says torch
    trace_dir = workdir / "trace"
    trace_dir.mkdir()
    os.environ[hop_trace.TRACE_DIR_ENV] = str(trace_dir)  # every process of the topology
    try:
        with compose_topology(workdir, node_extra={"message-audit-dir": str(audit_dir),
                                                   "backend": backend},
                              supernode_program=supernode) as topology:
            roots = {name: node.process.pid for name, node in topology.nodes.items()}
            ids = {node.wait_registered(): name for name, node in topology.nodes.items()}
            with MemorySampler(roots) as memory:
                code = topology.submit(run_dir, overrides, log_name="submit.log",
                                       timeout=3600)
    finally:
        del os.environ[hop_trace.TRACE_DIR_ENV]
    if code != 0:
        raise HarnessError(f"the {backend} run failed; see {workdir / 'submit.log'}")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").open()]
    audits = [json.loads(p.read_text()) for p in audit_dir.glob("*.json")]
    process_seconds = {name: _process_seconds_by_round(windows, protocol, rounds)
                       for name, windows in memory.clientapps.items()}
    per_round = []
    for row in rows:
        train = [c for c in clients if c["round"] == row["round"] and c["phase"] == "train"]
        slowest = max(train, key=lambda c: c["train-seconds"])
        process = process_seconds.get(ids.get(slowest["node-id"], ""), {}).get(
            row["round"], math.nan)
        per_round.append({
            "round": row["round"], "round-seconds": row["round-seconds"],
            "local-training-seconds": slowest["train-seconds"],
            "local-training-share": slowest["train-seconds"] / row["round-seconds"],
            "everything-else-seconds": row["round-seconds"] - slowest["train-seconds"],
            "train-phase-seconds": row["train-phase-seconds"],
            "eval-phase-seconds": row["eval-phase-seconds"],
            "client-handler-overhead-seconds": statistics.median(
                c["handler-seconds"] - c["train-seconds"] for c in train),
            "outside-device-seconds": row["round-seconds"] - process,
            "clientapp-process-seconds": process,
            "process-outside-handler-seconds": process - slowest["handler-seconds"],
            "handler-outside-training-seconds": slowest["handler-seconds"]
            - slowest["train-seconds"],
            "local-training-share-of-process": slowest["train-seconds"] / process
            if process else math.nan,  # no process sampled in the round (50 ms period)
            "eval-return-mean": row["eval"].get("eval-return-mean")})
    later = per_round[1:]
    summary = {key: statistics.median(r[key] for r in later) for key in later[0]
               if key not in ("round", "eval-return-mean")}
    reply_bytes = defaultdict(list)
    for audit in audits:
        if audit["message-type"] == "train" and audit["error"] is None:
            reply_bytes[ids.get(audit["node-id"], str(audit["node-id"]))].append(
                audit["serialized-bytes"])
    weight_bytes = statistics.median(
        b for r in rows for b in r["updates"]["upload-bytes-per-client"].values())
    devices = [{"device": name, "train replies": len(reply_bytes[name]),
                "reply bytes (median)": statistics.median(reply_bytes[name]),
                "fp32 weight bytes": weight_bytes,
                "ClientApp processes": len(memory.clientapps[name]),
                "peak RSS tree MiB (summed)": memory.peak_total[name] / 1024,
                "peak PSS tree MiB": memory.peak_pss_total[name] / 1024,
                **{f"peak {k} MiB": memory.peak_by_kind[name].get(k, 0) / 1024
                   for k in PROCESS_KINDS}}
               for name in topology.nodes]
    # fused: the ServerApp's k-th push is round k's message to every device
    per_cycle = hop_breakdown.cycles(hop_trace.read(trace_dir)) if protocol == "fused" else []
    for cycle in per_cycle:
        cycle["critical"] = ids.get(int(cycle["critical"]), str(cycle["critical"]))
    return {"protocol": protocol, "supernode": supernode, "flat-wire": flat_wire,
            "hops-per-round": per_cycle,
            "hops-median-rounds-2-on": hop_breakdown.median_hops(per_cycle[1:rounds]),
            # real devices have no partition id: replies are summed in device-key order
            # (common/device_key.py), node id only breaking ties
            "aggregation-order": [ids[node] for _, node in sorted(
                {(c.get("device-key", 0), c["node-id"]) for c in clients if c["node-id"] in ids})],
            "round-1": per_round[0],
            "median-rounds-2-on": summary, "per-round": per_round, "devices": devices}


def _hop_table(results: dict[str, dict]) -> str:
    """Rows: the hops of :mod:`simulations.hop_breakdown`; columns: seconds and share
    of the round for each fused setup."""
    fused = {key: r["hops-median-rounds-2-on"] for key, r in results.items()
             if r["hops-median-rounds-2-on"]}
    if not fused:
        return "(no fused setup measured)"
    rows = []
    for name in [*(hop for hop, _, _ in hop_breakdown.HOPS), "cycle"]:
        row: dict[str, object] = {"hop": name if name != "cycle" else "round (push to push)"}
        for key, hops in fused.items():
            seconds = hops.get(name, math.nan)
            row[f"{key} s"] = seconds
            row[f"{key} share"] = f"{seconds / hops['cycle']:.0%}" if hops.get("cycle") else ""
        rows.append(row)
    return markdown_table(rows, list(rows[0]))


def _process_seconds_by_round(windows: dict[int, list[float]], protocol: str, rounds: int
                              ) -> dict[int, float]:
    """A device's ClientApp process lifetimes (in start order) summed per round: fused,
    one train message per round and the last round's evaluate message; otherwise a train
    and an evaluate message per round."""
    lives = [last - first for first, last in sorted(windows.values())]
    if protocol == "fused":
        owner = [*range(1, rounds + 1), rounds]
    else:
        owner = [r for r in range(1, rounds + 1) for _ in range(2)]
    by_round: dict[int, float] = defaultdict(float)
    for server_round, seconds in zip(owner, lives, strict=False):
        by_round[server_round] += seconds
    return dict(by_round)


def run_federation(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One cell: a federation of ``params["backend"]`` devices deployed as
    ``params["setup"]``, with the machine's load around it (other work skews every
    number here: the result says how much there was)."""
    load_before = os.getloadavg()[0]
    result = measure(workdir / "federation", params["backend"], params["rounds"],
                     params["local-steps"] or None, params["hidden-sizes"] or None,
                     **SETUPS[params["setup"]])
    return {**result, "load-average-1min": {"before": load_before,
                                            "after": os.getloadavg()[0]},
            "cpu-affinity": sorted(os.sched_getaffinity(0))}


DEPLOYED_FEDERATION = CellKind("deployment-federation", run_federation, (
    *PRODUCT_CODE, "fedq.simulations.bench_deployment", "fedq.simulations.compose_topology",
    "fedq.simulations.flower_runtime", "fedq.simulations.hop_breakdown"))


def _key(cell: Cell, repeats: int) -> str:
    """The row label of a cell's federation: backend and setup (and repeat)."""
    p = cell.params
    return f"{p['backend']} {p['setup']}" + (f" #{p['repeat'] + 1}" if repeats > 1 else "")


def cells(params: Mapping[str, Any]) -> list[Cell]:
    if params["rounds"] < 3:
        raise HarnessError(f"rounds: must be >= 3 (round 1 is reported apart), got "
                           f"{params['rounds']}")
    shared = {k: params[k] for k in ("rounds", "local-steps", "hidden-sizes")}
    return [Cell(DEPLOYED_FEDERATION, {"backend": backend, "setup": setup, "repeat": repeat,
                                       **shared})
            for backend in name_list(params, "backends", BACKENDS)
            for setup in name_list(params, "setups", list(SETUPS))
            for repeat in range(params["repeats"])]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = {_key(cell, params["repeats"]): result for cell, result in done}
    compose_run = submit_overrides(load_compose(COMPOSE))
    local_steps = params["local-steps"] or compose_run["local-steps"]
    rounds = params["rounds"]
    loads = [r["load-average-1min"][when] for r in results.values()
             for when in ("before", "after")]
    round_rows = [{"setup": key, "rounds": label, **values}
                  for key, result in results.items()
                  for label, values in (("1 (warm-up)", result["round-1"]),
                                        (f"2-{rounds} median", result["median-rounds-2-on"]))]
    phase_table = markdown_table(round_rows, ["setup", "rounds", *PHASE_COLUMNS])
    curves = [{"setup": key, **{f"round {r['round']}": r["eval-return-mean"]
                                for r in result["per-round"]},
               "aggregation order": " ".join(result["aggregation-order"])}
              for key, result in results.items()]
    devices = [{"setup": key, **device} for key, result in results.items()
               for device in result["devices"]]
    setups = {name: SETUPS[name] for name in name_list(params, "setups", list(SETUPS))}
    text = (f"Deployed round on loopback: 3 SuperNodes (docker-compose.yml node configs), "
            f"CartPole, local-steps {local_steps}, one federation per backend and setup "
            f"({'; '.join(f'{k}: {v}' for k, v in setups.items())}), one at a time, CPUs "
            f"{results[next(iter(results))]['cpu-affinity']}, load average "
            f"{min(loads):.1f}-{max(loads):.1f} around the federations. Local-training share "
            f"= the slowest device's train-seconds / round-seconds (median of rounds "
            f"2-{rounds}).\n\nWhere the round goes, from per-phase timestamps (seconds, the "
            f"device that trained longest; see the module docstring):\n\n{phase_table}\n\n"
            f"Hop by hop (fused setups; seconds, median of rounds 2-{rounds}, the device "
            f"whose reply reached the ServerApp last; per-process timestamps of "
            f"common/hop_trace.py, simulations/hop_breakdown.py):\n\n{_hop_table(results)}"
            f"\n\nFederated evaluation (eval-return-mean) per round, and the order in which "
            f"the server sums the devices' updates (by node id, which the SuperLink draws at "
            f"random):\n\n{markdown_table(curves, list(curves[0]))}\n\n"
            f"{markdown_table(devices, list(devices[0]))}")
    return Summary(round_rows, ["setup", "rounds", *ROUND_COLUMNS], text,
                   payload={"run-config": compose_run, "setups": setups,
                            "results": results})


_DEPLOYMENT = {"backends": "torch,numpy", "setups": "fused,baseline", "rounds": 5,
               "local-steps": 2000, "hidden-sizes": "", "repeats": 1}
_QUICK = {"backends": "numpy", "setups": "fused", "rounds": 3, "local-steps": 50}
for _name, _doc, _defaults in (
        ("deployment", "a deployed round on loopback, 3 SuperNodes, torch vs numpy devices, "
         "fused with fedq-supernode vs train-then-evaluate with flower-supernode", {}),
        ("deployment_repeats", "the numpy devices' deployed round, fused vs baseline, twice "
         "each", {"backends": "numpy", "repeats": 2}),
        ("deployment_flat_wire", "the flat wire format's A/B: fused rounds with the weights "
         "as one flat array vs one array per tensor", {"setups": "fused,per-tensor",
                                                        "repeats": 2}),
        ("deployment_quiet", "the fused deployed round, torch and numpy devices, three "
         "federations each", {"setups": "fused", "repeats": 3}),
        ("deployment_numpy_4000", "the numpy devices' fused round at 4,000 local steps",
         {"backends": "numpy", "setups": "fused", "local-steps": 4000, "repeats": 2})):
    register_benchmark(Benchmark(_name, _doc, defaults={**_DEPLOYMENT, **_defaults},
                                 quick=_QUICK, cells=cells, summarise=summarise,
                                 parallel=False))
