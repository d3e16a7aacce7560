"""What do compressed updates save, and what do they cost in return? 5 CartPole clients.

The same federated FedAvg run (5 devices, :mod:`simulations.bench_robustness`'s clean
settings) with ``update-compression`` = none (fp32 weights), int8 and optionally fp16
(deltas with error feedback, :mod:`common.compression`). Bytes per round: the
ArrayRecord payload bytes the server received from all devices in one round, as
recorded in ``metrics.jsonl`` (``updates.upload-bytes-per-client``), median over rounds.
Final return: the global model's last 3 checkpoints, 10 greedy episodes each, averaged
over seeds. Targets: int8 >= 3.5x fewer bytes per round, final return within 2% of fp32.

    python -m fedq.simulations.bench communication   # the committed results

The fp32 runs are bench_robustness's clean FedAvg runs (the same ``federated-run`` cells of
:mod:`simulations.harness`, cached once under ``runs/harness/``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.bench_robustness import CLIENTS, cell_config
from fedq.simulations.federated_cell import curve, federated_cell, mean_over_rounds
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    Summary,
    cell_key,
    register_benchmark,
    results_by_cell,
)


def round_bytes(rows: list[dict[str, Any]]) -> list[int]:
    """Bytes all devices sent the server, per round."""
    return [sum(r["updates"]["upload-bytes-per-client"].values()) for r in rows]


def _modes(params: Mapping[str, Any]) -> list[str]:
    modes = str(params["modes"]).split(",")
    if modes[0] != "none":
        raise ValueError("communication: modes must start with none (the fp32 baseline)")
    return modes


def _plan(params: Mapping[str, Any]) -> list[tuple[str, int, Cell]]:
    out = []
    for mode in _modes(params):
        for seed in range(params["seeds"]):
            overrides = cell_config({"strategy": "fedavg"}, seed, params)
            if mode != "none":
                overrides["update-compression"] = mode
            out.append((mode, seed, federated_cell(overrides, CLIENTS)))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _plan(params)]


def plot(runs_by_mode: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sizes) = plt.subplots(1, 2, figsize=(10, 3.8),
                                        gridspec_kw={"width_ratios": [2, 1]})
    for mode, runs in runs_by_mode.items():
        for i, run in enumerate(runs):
            steps, returns = curve(run["rows"])
            curves.plot(steps, returns, marker="o", markersize=3, alpha=0.8,
                        color=f"C{list(runs_by_mode).index(mode)}",
                        linestyle="-" if i == 0 else "--", label=f"{mode} (seed {i})")
    curves.set_xlabel("env steps per client")
    curves.set_ylabel("federated greedy return (mean over devices)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    medians = [statistics.median(b for c in runs for b in round_bytes(c["rows"])) / 1024
               for runs in runs_by_mode.values()]
    sizes.bar(list(runs_by_mode), medians, color=[f"C{i}" for i in range(len(runs_by_mode))])
    for i, kib in enumerate(medians):
        sizes.text(i, kib, f"{kib:.1f}", ha="center", va="bottom", fontsize=8)
    sizes.set_ylabel(f"KiB uploaded per round ({CLIENTS} devices)")
    fig.suptitle("CartPole-v1, 5 devices, FedAvg: update compression", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = results_by_cell(done)
    runs_by_mode: dict[str, list[dict]] = {}
    for mode, _, cell in _plan(params):
        if cell_key(cell) in results:
            runs_by_mode.setdefault(mode, []).append(results[cell_key(cell)])
    if "none" not in runs_by_mode:
        raise ValueError("communication: no fp32 (none) run finished to compare against")
    base_bytes = statistics.median(b for c in runs_by_mode["none"]
                                   for b in round_bytes(c["rows"]))
    base_score = statistics.fmean(c["score"] for c in runs_by_mode["none"])
    table = []
    for mode, runs in runs_by_mode.items():
        per_round = statistics.median(b for c in runs for b in round_bytes(c["rows"]))
        score = statistics.fmean(c["score"] for c in runs)
        table.append({
            "update encoding": "fp32 weights" if mode == "none" else f"{mode} delta + EF",
            "bytes per round (median)": per_round,
            "bytes per client per round": per_round / CLIENTS,
            "smaller than fp32": base_bytes / per_round,
            "final greedy return": score,
            "per seed": ", ".join(f"{c['score']:.0f}" for c in runs),
            "return vs fp32": score / base_score if base_score else float("nan"),
            "mean return over rounds": statistics.fmean(mean_over_rounds(c["rows"])
                                                        for c in runs),
        })
    columns = ["update encoding", "bytes per round (median)", "bytes per client per round",
               "smaller than fp32", "final greedy return", "per seed", "return vs fp32",
               "mean return over rounds"]
    text = (f"CartPole-v1, {CLIENTS} devices, FedAvg, {params['rounds']} rounds x "
            f"{params['local-steps']} local env steps, default 4-64-64-2 Q-network (4,610 "
            "weights). Bytes: serialised ArrayRecord arrays the server received (each array "
            "carries a ~128-byte header), device-to-server only; the server still sends fp32 "
            "weights. Final greedy return: the global model's last 3 checkpoints, 10 "
            "episodes each, mean over seeds.")
    return Summary(table, columns, text, payload={
        "clients": CLIENTS,
        "runs": [{"mode": m, "ok": c["ok"], "score": c["score"],
                  "bytes-per-round": round_bytes(c["rows"]), "curve": curve(c["rows"])}
                 for m, runs in runs_by_mode.items() for c in runs]},
        plot=lambda path: plot(runs_by_mode, path))


BENCHMARK = register_benchmark(Benchmark(
    "communication", "int8 / fp16 update deltas with error feedback vs fp32 weights, 5 "
    "CartPole devices", defaults={"seeds": 5, "rounds": 12, "local-steps": 2500,
                                  "eval-episodes": 5, "modes": "none,int8"},
    quick={"seeds": 1, "rounds": 1, "local-steps": 100, "eval-episodes": 1},
    cells=cells, summarise=summarise, plot_name="communication.png"))
