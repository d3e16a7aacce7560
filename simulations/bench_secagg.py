"""What does secure aggregation cost per round? The same federated run with and without SecAgg+.

Runs of the same FedAvg federation (CartPole-v1, default 4-64-64-2 Q-network,
``--clients`` devices in Flower's simulation engine, ``--rounds`` rounds of
``--local-steps`` env steps) in three modes: plain (``secure-aggregation = false``),
SecAgg+ (``secure-aggregation = true``) and SecAgg+ with distributed DP (``central-dp =
"distributed"``, noise multiplier 1, clip norm 1). All set ``validate-updates = false``
(SecAgg+ requires it), so they differ only in how updates reach the server. By default
``--learning-starts`` is above the run's env steps, so no gradient update runs: a round
is its env steps, its messages and, with SecAgg+, the protocol, which is what is
measured (with training the protocol's share only shrinks). The modes alternate
``--repeats`` times so that load drift on a shared machine hits them alike.

Per round, from ``metrics.jsonl``: the train phase's wall time (sampling, local steps and,
with SecAgg+, the protocol's four message exchanges) and the whole round's, median over
the rounds of all repeats; the ratio is against the plain runs of the same invocation.
Bytes: every train reply a device sent, serialized as its SuperNode pushes it
(``message-audit-dir``, :mod:`client.message_audit`), summed per device and round:
device-to-server only.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m fedq.simulations.bench_secagg
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedq.simulations.results_io import markdown_table, write_results
from fedq.simulations.run import resolve_run_config, simulate

MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "secagg+": {"secure-aggregation": True},
    "secagg+ distributed DP": {"secure-aggregation": True, "central-dp": "distributed",
                               "central-dp-noise-multiplier": 1.0,
                               "central-dp-clip-norm": 1.0},
}


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One run of ``mode``; its per-round timings and per-device train bytes."""
    run_dir = Path(tempfile.mkdtemp(prefix=mode.replace(" ", "-").replace("+", "plus"),
                                    dir=root))
    overrides = {"num-server-rounds": args.rounds, "local-steps": args.local_steps,
                 "learning-starts": args.learning_starts,
                 "eval-episodes": 1, "min-available-clients": args.clients,
                 "validate-updates": False, "seed": args.seed, "run-dir": str(run_dir),
                 "message-audit-dir": str(run_dir / "audit"), **MODES[mode]}
    if "central-dp" in overrides:
        overrides["central-dp-clients"] = args.clients
    _, run_config = resolve_run_config(overrides, clients=args.clients)
    result = simulate(run_config, args.clients, stream=False, timeout=3600)
    if not result.ok:
        raise SystemExit(f"{mode}: the run failed:\n{result.output[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [json.loads(p.read_text()) for p in (run_dir / "audit").glob("*.json")]
    train = [m for m in sent if m["message-type"] == "train"]
    rounds = len(rows)
    return {
        "mode": mode,
        "train-phase-seconds": [r["train-phase-seconds"] for r in rows],
        "round-seconds": [r["round-seconds"] for r in rows],
        "train-bytes-per-device-round": sum(m["serialized-bytes"] for m in train)
        / (args.clients * rounds),
        "train-messages-per-device-round": len(train) / (args.clients * rounds),
        "central-dp": rows[-1].get("central-dp"),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--learning-starts", type=int, default=10**9,
                        help="default: no gradient updates (the protocol's cost alone)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedq-bench-secagg-") as tmp:
        runs = []
        for _ in range(args.repeats):
            for mode in MODES:
                runs.append(run_mode(mode, args, Path(tmp)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "central-dp"}),
                  flush=True)
    table = summary(runs)
    columns = list(table[0])
    markdown = markdown_table(table, columns)
    print(markdown)
    folder = write_results(
        "secagg",
        {"clients": args.clients, "rounds": args.rounds, "local-steps": args.local_steps,
         "learning-starts": args.learning_starts, "repeats": args.repeats, "seed": args.seed,
         "summary": table, "runs": runs},
        f"{markdown}\n\nCartPole-v1, {args.clients} devices in Flower's simulation engine, "
        f"FedAvg, {args.rounds} rounds x {args.local_steps} local env steps, learning-starts "
        f"{args.learning_starts} (no gradient updates unless below the run's steps), "
        f"{args.repeats} alternating repeats per mode, default 4-64-64-2 Q-network (4,610 "
        "weights), validate-updates = false in every run. Times: medians over the rounds of "
        "all repeats of metrics.jsonl's train-phase-seconds and round-seconds. Bytes: every "
        "train reply a device sent (SecAgg+: its public keys, encrypted key shares, masked "
        "vector with metrics, and key shares for unmasking), serialized, device-to-server "
        "only. Distributed DP: noise multiplier 1, clip norm 1.\n")
    print(f"results in {folder}")


if __name__ == "__main__":
    main()
