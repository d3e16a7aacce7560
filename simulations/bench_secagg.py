"""What does secure aggregation cost per round? The same federated run with and without SecAgg+.

Runs of the same FedAvg federation (CartPole-v1, default 4-64-64-2 Q-network,
``clients`` devices in Flower's simulation engine, ``rounds`` rounds of
``local-steps`` env steps) in three modes: plain (``secure-aggregation = false``),
SecAgg+ (``secure-aggregation = true``) and SecAgg+ with distributed DP (``central-dp =
"distributed"``, noise multiplier 1, clip norm 1). All set ``validate-updates = false``
(SecAgg+ requires it), so they differ only in how updates reach the server. By default
``learning-starts`` is above the run's env steps, so no gradient update runs: a round
is its env steps, its messages and, with SecAgg+, the protocol, which is what is
measured (with training the protocol's share only shrinks). Each run is one cell; the
cells are declared repeat by repeat, the modes alternating within each, and run one at a
time in that order, so that load drift on a shared machine hits the modes alike.

Per round, from ``metrics.jsonl``: the train phase's wall time (sampling, local steps and,
with SecAgg+, the protocol's four message exchanges) and the whole round's, median over
the rounds of all repeats; the ratio is against the plain runs of the same invocation.
Bytes: every train reply a device sent, serialized as its SuperNode pushes it
(``message-audit-dir``, :mod:`client.message_audit`), summed per device and round:
device-to-server only.

    python -m fedq.simulations.bench secagg
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    HarnessError,
    Summary,
    register_benchmark,
)
from fedq.simulations.run import resolve_run_config, simulate

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "secagg+": {"secure-aggregation": True},
    "secagg+ distributed DP": {"secure-aggregation": True, "central-dp": "distributed",
                               "central-dp-noise-multiplier": 1.0,
                               "central-dp-clip-norm": 1.0},
}


def run_mode(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One run of ``params["mode"]``; its per-round timings and per-device train bytes."""
    clients, mode = params["clients"], params["mode"]
    run_dir = workdir / "run"
    overrides = {"num-server-rounds": params["rounds"], "local-steps": params["local-steps"],
                 "learning-starts": params["learning-starts"],
                 "eval-episodes": 1, "min-available-clients": clients,
                 "validate-updates": False, "seed": params["seed"], "run-dir": str(run_dir),
                 "message-audit-dir": str(run_dir / "audit"), **MODES[mode]}
    if "central-dp" in overrides:
        overrides["central-dp-clients"] = clients
    _, run_config = resolve_run_config(overrides, clients=clients)
    result = simulate(run_config, clients, stream=False, timeout=3600)
    if not result.ok:
        raise HarnessError(f"secagg {mode}: the run failed:\n{result.output[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [json.loads(p.read_text()) for p in (run_dir / "audit").glob("*.json")]
    train = [m for m in sent if m["message-type"] == "train"]
    rounds = len(rows)
    return {
        "mode": mode,
        "train-phase-seconds": [r["train-phase-seconds"] for r in rows],
        "round-seconds": [r["round-seconds"] for r in rows],
        "train-bytes-per-device-round": sum(m["serialized-bytes"] for m in train)
        / (clients * rounds),
        "train-messages-per-device-round": len(train) / (clients * rounds),
        "central-dp": rows[-1].get("central-dp"),
    }


SECAGG_RUN = CellKind("secagg-run", run_mode, (
    *PRODUCT_CODE, "fedq.simulations.bench_secagg", "fedq.simulations.run",
    "fedq.simulations.attacks", "fedq.simulations.flower_runtime",
    "fedq.simulations.scenario"))


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per mode (its repeats pooled), ratios against the plain runs."""
    pooled: dict[str, dict[str, Any]] = {}
    for run in runs:
        into = pooled.setdefault(run["mode"], {"mode": run["mode"], "train-phase-seconds": [],
                                               "round-seconds": [], "bytes": []})
        into["train-phase-seconds"] += run["train-phase-seconds"]
        into["round-seconds"] += run["round-seconds"]
        into["bytes"].append(run["train-bytes-per-device-round"])
        into["train-messages-per-device-round"] = run["train-messages-per-device-round"]
    for into in pooled.values():
        into["train-bytes-per-device-round"] = statistics.median(into["bytes"])
    base = pooled["plain"]
    base_train = statistics.median(base["train-phase-seconds"])
    base_round = statistics.median(base["round-seconds"])
    table = []
    for run in pooled.values():
        train = statistics.median(run["train-phase-seconds"])
        whole = statistics.median(run["round-seconds"])
        table.append({
            "mode": run["mode"],
            "train phase s (median)": train,
            "train phase vs plain": train / base_train,
            "round s (median)": whole,
            "round vs plain": whole / base_round,
            "train replies per device per round": run["train-messages-per-device-round"],
            "bytes sent per device per round": run["train-bytes-per-device-round"],
            "bytes vs plain": run["train-bytes-per-device-round"]
            / base["train-bytes-per-device-round"],
        })
    return table


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """Repeat by repeat, every mode in turn (the order the cells run in)."""
    shared = {k: params[k] for k in ("clients", "rounds", "local-steps", "learning-starts",
                                     "seed")}
    return [Cell(SECAGG_RUN, {"mode": mode, "repeat": repeat, **shared})
            for repeat in range(params["repeats"]) for mode in MODES]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    runs = [result for _, result in done]
    table = summary(runs)
    return Summary(
        table, list(table[0]),
        f"CartPole-v1, {params['clients']} devices in Flower's simulation engine, FedAvg, "
        f"{params['rounds']} rounds x {params['local-steps']} local env steps, learning-starts "
        f"{params['learning-starts']} (no gradient updates unless below the run's steps), "
        f"{params['repeats']} alternating repeats per mode, default 4-64-64-2 Q-network (4,610 "
        "weights), validate-updates = false in every run. Times: medians over the rounds of "
        "all repeats of metrics.jsonl's train-phase-seconds and round-seconds. Bytes: every "
        "train reply a device sent (SecAgg+: its public keys, encrypted key shares, masked "
        "vector with metrics, and key shares for unmasking), serialized, device-to-server "
        "only. Distributed DP: noise multiplier 1, clip norm 1.",
        payload={"runs": runs})


register_benchmark(Benchmark(
    "secagg", "a round with SecAgg+ (and with distributed DP) vs the same round without, "
    "in Flower's simulation engine",
    defaults={"clients": 4, "rounds": 10, "local-steps": 100, "learning-starts": 10**9,
              "repeats": 2, "seed": 0},
    quick={"clients": 2, "rounds": 2, "local-steps": 20, "repeats": 1},
    cells=cells, summarise=summarise, parallel=False))
