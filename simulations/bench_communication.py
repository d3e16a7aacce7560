"""What do compressed updates save, and what do they cost in return? 5 CartPole clients.

The same federated FedAvg run (5 devices, :mod:`simulations.bench_robustness`'s clean
settings) with ``update-compression`` = none (fp32 weights), int8 and optionally fp16
(deltas with error feedback, :mod:`common.compression`). Bytes per round: the
ArrayRecord payload bytes the server received from all devices in one round, as
recorded in ``metrics.jsonl`` (``updates.upload-bytes-per-client``), median over rounds.
Final return: the global model's last 3 checkpoints, 10 greedy episodes each, averaged
over seeds. Targets: int8 >= 3.5x fewer bytes per round, final return within 2% of fp32.

    python -m fedq.simulations.bench_communication --seeds 2

The fp32 runs are bench_robustness's clean FedAvg runs (shared cache, reused).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedq.simulations.bench_robustness import CACHE, CLIENTS, cell_config, cell_name
from fedq.simulations.federated_cells import Cell, curve, mean_over_rounds, run_cell
from fedq.simulations.results_io import RESULTS_ROOT, markdown_table, write_results


def round_bytes(cell: Cell) -> list[int]:
    """Bytes all devices sent the server, per round."""
    return [sum(r["updates"]["upload-bytes-per-client"].values()) for r in cell.rows]


def plot(cells: dict[str, list[Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sizes) = plt.subplots(1, 2, figsize=(10, 3.8),
                                        gridspec_kw={"width_ratios": [2, 1]})
    for mode, runs in cells.items():
        for i, cell in enumerate(runs):
            steps, returns = curve(cell.rows)
            curves.plot(steps, returns, marker="o", markersize=3, alpha=0.8,
                        color=f"C{list(cells).index(mode)}", linestyle="-" if i == 0 else "--",
                        label=f"{mode} (seed {i})")
    curves.set_xlabel("env steps per client")
    curves.set_ylabel("federated greedy return (mean over devices)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    medians = [statistics.median(b for c in runs for b in round_bytes(c)) / 1024
               for runs in cells.values()]
    sizes.bar(list(cells), medians, color=[f"C{i}" for i in range(len(cells))])
    for i, kib in enumerate(medians):
        sizes.text(i, kib, f"{kib:.1f}", ha="center", va="bottom", fontsize=8)
    sizes.set_ylabel(f"KiB uploaded per round ({CLIENTS} devices)")
    fig.suptitle("CartPole-v1, 5 devices, FedAvg: update compression", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--modes", default="none,int8", help="comma-separated; none first")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "none":
        parser.error("--modes must start with none (the fp32 baseline)")
    cells: dict[str, list[Cell]] = {}
    for mode in modes:
        for seed in range(args.seeds):
            overrides = cell_config({"strategy": "fedavg"}, seed, args)
            tag = "clean-fedavg" if mode == "none" else f"clean-fedavg-{mode}"
            if mode != "none":
                overrides["update-compression"] = mode
            cell = run_cell(CACHE, cell_name(tag, seed, args), overrides, CLIENTS)
            print(json.dumps({"mode": mode, "seed": seed, "ok": cell.ok, "score": cell.score,
                              "bytes-per-round": statistics.median(round_bytes(cell))}),
                  flush=True)
            cells.setdefault(mode, []).append(cell)
    base_bytes = statistics.median(b for c in cells["none"] for b in round_bytes(c))
    base_score = statistics.fmean(c.score for c in cells["none"])
    table = []
    for mode, runs in cells.items():
        per_round = statistics.median(b for c in runs for b in round_bytes(c))
        score = statistics.fmean(c.score for c in runs)
        table.append({
            "update encoding": "fp32 weights" if mode == "none" else f"{mode} delta + EF",
            "bytes per round (median)": per_round,
            "bytes per client per round": per_round / CLIENTS,
            "smaller than fp32": base_bytes / per_round,
            "final greedy return": score,
            "per seed": ", ".join(f"{c.score:.0f}" for c in runs),
            "return vs fp32": score / base_score if base_score else float("nan"),
            "mean return over rounds": statistics.fmean(mean_over_rounds(c) for c in runs),
        })
    columns = ["update encoding", "bytes per round (median)", "bytes per client per round",
               "smaller than fp32", "final greedy return", "per seed", "return vs fp32",
               "mean return over rounds"]
    markdown = markdown_table(table, columns)
    print(markdown)
    folder = write_results(
        "communication",
        {"clients": CLIENTS, "rounds": args.rounds, "local-steps": args.local_steps,
         "summary": table,
         "cells": [{"mode": m, "name": c.name, "ok": c.ok, "score": c.score,
                    "bytes-per-round": round_bytes(c), "curve": curve(c.rows)}
                   for m, runs in cells.items() for c in runs]},
        f"{markdown}\n\n![compression](communication.png)\n\nCartPole-v1, {CLIENTS} devices, "
        f"FedAvg, {args.rounds} rounds x {args.local_steps} local env steps, default 4-64-64-2 "
        "Q-network (4,610 weights). Bytes: serialised ArrayRecord arrays the server received "
        "(each array carries a ~128-byte header), device-to-server only; the server still "
        "sends fp32 weights. Final greedy return: the global model's last 3 checkpoints, "
        "10 episodes each, mean over seeds.\n")
    plot(cells, RESULTS_ROOT / "communication" / "communication.png")
    print(f"results in {folder}")


if __name__ == "__main__":
    main()
