"""A deployed round on loopback: where the time goes, what each device sends, its memory.

The docker-compose.yml federation as local processes (:mod:`simulations.compose_topology`):
a SuperLink, its three CartPole SuperNodes with their node configs, the run submitted
with the submit service's command line and run config (``local-steps`` 2000, ...), for
``--rounds`` rounds. Per round (round 1, the warm-up that installs the app and fills no
buffer yet, reported apart; the median over the others):

* **local training**: the slowest device's ``train-seconds`` (its env steps and DQN
  updates), since the round waits for it;
* **everything else**: the round's wall time minus that: starting a ClientApp process
  per message (Python + torch imports), loading/saving the device state, moving the
  weights through the SuperLink, collecting the replies (50-500 ms polling:
  server/prompt_grid.py), aggregation, federated evaluation, metrics and checkpoint.

It runs one federation per learner backend (``--backends torch,numpy``): the torch
backend's ClientApp processes import torch (and opacus with DP), the numpy backend's
import neither, so the two show what a device's imports cost per round.

Bytes sent per device and round: the serialized train reply (weights + metrics, every
object of Flower's message tree) measured by the ClientApp's message-audit mod as the
message leaves, next to the raw fp32 weight bytes the server counted.
Memory: peak resident set of each device's process tree (``flower-supernode``, its
SuperExec and the ``flwr-clientapp`` process of the moment), sampled every 50 ms.

    python -m fedq.simulations.bench_deployment --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

from fedq.simulations.compose_topology import (
    COMPOSE,
    compose_topology,
    load_compose,
    submit_overrides,
)
from fedq.simulations.results_io import markdown_table, write_results

WORKDIR = Path("runs") / "bench_deployment"


class MemorySampler:
    """Peak RSS of each SuperNode's process tree, sampled in a background thread."""

    def __init__(self, roots: dict[str, int], period: float = 0.05) -> None:
        self.roots = roots
        self.period = period
        self.peak_total: dict[str, int] = defaultdict(int)
        self.peak_by_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
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
            for name, root in self.roots.items():
                total = 0
                for pid in _tree(root, children):
                    rss, kind = _rss_kb(pid), _kind(pid)
                    total += rss
                    by_kind = self.peak_by_kind[name]
                    by_kind[kind] = max(by_kind[kind], rss)
                self.peak_total[name] = max(self.peak_total[name], total)
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


def _kind(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    names = [Path(a.decode(errors="replace")).name for a in argv[:2]]
    for kind in ("flower-supernode", "flower-superexec", "flwr-clientapp"):
        if kind in names:
            return kind
    return names[0] if names else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=None,
                        help="override the compose file's local-steps")
    parser.add_argument("--backends", default="torch,numpy",
                        help="devices' learner backends to measure, one federation each, "
                        "in this order (default torch,numpy)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (round 1 is reported apart)")
    backends = args.backends.split(",")
    if unknown := sorted(set(backends) - set(BACKENDS)):
        parser.error(f"--backends: unknown {unknown}; known: {list(BACKENDS)}")
    shutil.rmtree(WORKDIR, ignore_errors=True)
    compose_run = submit_overrides(load_compose(COMPOSE))
    load_before = os.getloadavg()[0]
    results = {backend: measure(WORKDIR / backend, backend, args.rounds, args.local_steps)
               for backend in backends}
    local_steps = args.local_steps or compose_run["local-steps"]
    payload = {"rounds": args.rounds, "local-steps": local_steps, "run-config": compose_run,
               "cpu-affinity": sorted(os.sched_getaffinity(0)),
               # other work on the machine skews every number here: say how much there was
               "load-average-1min": {"before": load_before, "after": os.getloadavg()[0]},
               "backends": results}
    round_rows = [{"backend": backend, "rounds": label, **values}
                  for backend, result in results.items()
                  for label, values in (("1 (warm-up)", result["round-1"]),
                                        (f"2-{args.rounds} median",
                                         result["median-rounds-2-on"]))]
    round_table = markdown_table(round_rows, ["backend", "rounds", *ROUND_COLUMNS])
    devices = [{"backend": backend, **device} for backend, result in results.items()
               for device in result["devices"]]
    device_table = markdown_table(devices, list(devices[0]))
    text = (f"Deployed round on loopback: 3 SuperNodes (docker-compose.yml node configs), "
            f"CartPole, local-steps {local_steps}, one federation per backend, CPUs "
            f"{payload['cpu-affinity']}, load average {load_before:.1f} before / "
            f"{os.getloadavg()[0]:.1f} after. Local-training share = the slowest device's "
            f"train-seconds / round-seconds (median of rounds 2-{args.rounds}).\n\n"
            f"{round_table}\n\n{device_table}")
    print(text)
    write_results("deployment", payload, text)


BACKENDS = ("torch", "numpy")
ROUND_COLUMNS = ["round-seconds", "local-training-seconds", "local-training-share",
                 "everything-else-seconds", "train-phase-seconds", "eval-phase-seconds",
                 "client-handler-overhead-seconds"]


def measure(workdir: Path, backend: str, rounds: int, local_steps: int | None
            ) -> dict[str, object]:
    """One compose federation whose devices all use ``backend``: per-round timings, reply
    sizes and each device's peak memory."""
    workdir.mkdir(parents=True)
    workdir = workdir.resolve()
    run_dir, audit_dir = workdir / "run", workdir / "audit"
    overrides = {"num-server-rounds": rounds, "backend": backend}
    if local_steps:
        overrides["local-steps"] = local_steps
    # the audit directory is each device's own setting: a run config cannot choose it
    with compose_topology(workdir, node_extra={"message-audit-dir": str(audit_dir)}) as topology:
        roots = {name: node.process.pid for name, node in topology.nodes.items()}
        ids = {node.wait_registered(): name for name, node in topology.nodes.items()}
        with MemorySampler(roots) as memory:
            code = topology.submit(run_dir, overrides, log_name="submit.log", timeout=3600)
    if code != 0:
        raise SystemExit(f"the {backend} run failed; see {workdir / 'submit.log'}")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").open()]
    audits = [json.loads(p.read_text()) for p in audit_dir.glob("*.json")]
    per_round = []
    for row in rows:
        train = [c for c in clients if c["round"] == row["round"] and c["phase"] == "train"]
        slowest = max(c["train-seconds"] for c in train)
        per_round.append({
            "round": row["round"], "round-seconds": row["round-seconds"],
            "local-training-seconds": slowest,
            "local-training-share": slowest / row["round-seconds"],
            "everything-else-seconds": row["round-seconds"] - slowest,
            "train-phase-seconds": row["train-phase-seconds"],
            "eval-phase-seconds": row["eval-phase-seconds"],
            "client-handler-overhead-seconds": statistics.median(
                c["handler-seconds"] - c["train-seconds"] for c in train)})
    later = per_round[1:]
    summary = {key: statistics.median(r[key] for r in later) for key in later[0]
               if key != "round"}
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
                "peak RSS tree MiB": memory.peak_total[name] / 1024,
                **{f"peak {k} MiB": memory.peak_by_kind[name].get(k, 0) / 1024
                   for k in ("flower-supernode", "flower-superexec", "flwr-clientapp")}}
               for name in topology.nodes]
    return {"round-1": per_round[0], "median-rounds-2-on": summary, "per-round": per_round,
            "devices": devices}


if __name__ == "__main__":
    main()
