"""Do update validation and robust aggregation hold off bad devices? 5 CartPole clients.

Scenarios, each a real federated run in Flower's simulation engine:

- clean: 5 honest devices, FedAvg (the reference);
- nan: device 4 sends all-NaN weights every round;
- noise: device 4 sends the global weights plus N(0, 10^2) noise per weight (an update
  norm ~200x an honest one).

The bad device is made by the simulated attacker (:mod:`simulations.attacks`, a client
mod only simulations add; the product has no attack setting). Each attack runs twice: plain
FedAvg with ``validate-updates = false`` (the contrast: what happens without the
defences) and ``validate-updates = true`` with a robust strategy (``--strategy``,
default FedTrimmedAvg). The score is the mean greedy return of the global model's last 3
checkpoints, 10 episodes each (:mod:`simulations.federated_cells`); target: defended
runs within 5% of the clean run.

    python -m fedq.simulations.bench_robustness --seeds 2

Finished runs are kept under ``runs/bench_robustness/`` and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import numpy as np

from fedq.simulations.attacks import Attack
from fedq.simulations.federated_cells import Cell, curve, mean_over_rounds, run_cell
from fedq.simulations.results_io import RESULTS_ROOT, markdown_table, write_results

CACHE = Path("runs/bench_robustness")
CLIENTS = 5
ATTACKER = CLIENTS - 1
ATTACKS = ("clean", "nan", "noise")


def plan(strategy: str) -> list[tuple[str, str, dict, str]]:
    """(attack, defence label, config overrides, run-name tag) of every scenario."""
    contrast = {"strategy": "fedavg", "validate-updates": False}
    defended = {"strategy": strategy, "validate-updates": True}
    cells = [("clean", "fedavg", {"strategy": "fedavg"}, "clean-fedavg")]
    for attack in ("nan", "noise"):
        cells += [(attack, "fedavg, no validation", contrast, f"{attack}-fedavg-noval"),
                  (attack, f"validation + {strategy}", defended, f"{attack}-{strategy}-val")]
    return cells


def cell_config(defence: dict, seed: int, args: argparse.Namespace) -> dict:
    return {"seed": seed, "local-steps": args.local_steps,
            "num-server-rounds": args.rounds, "eval-episodes": args.eval_episodes,
            **defence}


def cell_attack(attack: str) -> Attack | None:
    """Device ``ATTACKER`` sends ``attack``'s bad weights every round (None: clean)."""
    return None if attack == "clean" else Attack(attack, (ATTACKER,))


def cell_name(tag: str, seed: int, args: argparse.Namespace) -> str:
    """Shared with bench_communication: its fp32 cell is the clean FedAvg cell."""
    return f"{tag}-seed{seed}-r{args.rounds}-l{args.local_steps}"


def plot(groups: dict[tuple[str, str], list[Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5 * len(ATTACKS), 3.8), sharey=True)
    for ax, attack in zip(axes, ATTACKS, strict=True):
        for (group_attack, defence), cells in groups.items():
            if group_attack not in (attack, "clean"):
                continue
            steps, _ = curve(cells[0].rows)
            with warnings.catch_warnings():  # all-NaN rounds: no device could evaluate
                warnings.simplefilter("ignore", RuntimeWarning)
                returns = np.nanmean([curve(c.rows)[1] for c in cells], axis=0) \
                    if all(len(c.rows) == len(cells[0].rows) for c in cells) else curve(
                        cells[0].rows)[1]
            label = "clean, fedavg" if group_attack == "clean" else defence
            style = ":" if group_attack == "clean" else "-"
            ax.plot(steps, returns, style, marker="o", markersize=3, label=label)
        ax.set_title(f"{attack}" + ("" if attack == "clean" else
                                    f": device {ATTACKER} of {CLIENTS} attacks"))
        ax.set_xlabel("env steps per client")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("federated greedy return (mean over devices)")
    fig.suptitle("CartPole-v1, 5 devices: missing points = no device could evaluate "
                 "the (NaN) global model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--contrast-seeds", type=int, default=1,
                        help="seeds of the undefended runs (they fail either way)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--strategy", default="fedtrimmedavg",
                        choices=["fedmedian", "fedtrimmedavg", "krum"])
    args = parser.parse_args()
    groups: dict[tuple[str, str], list[Cell]] = {}
    for seed in range(max(args.seeds, args.contrast_seeds)):  # seed-major: early results
        for attack, label, defence, tag in plan(args.strategy):
            undefended = defence.get("validate-updates") is False
            if seed >= (args.contrast_seeds if undefended else args.seeds):
                continue
            cell = run_cell(CACHE, cell_name(tag, seed, args),
                            cell_config(defence, seed, args), CLIENTS,
                            attack=cell_attack(attack))
            print(json.dumps({"attack": attack, "defence": label, "seed": seed,
                              "ok": cell.ok, "score": cell.score,
                              "rounds": len(cell.rows)}), flush=True)
            groups.setdefault((attack, label), []).append(cell)
    clean = statistics.fmean(c.score for c in groups[("clean", "fedavg")])
    table = []
    for (attack, label), cells in groups.items():
        score = statistics.fmean(c.score for c in cells)
        rejected = [r["updates"]["rejected"] for c in cells for r in c.rows if "updates" in r]
        table.append({
            "attack": attack, "defence": label, "seeds": len(cells),
            "final greedy return": score,
            "per seed": ", ".join(f"{c.score:.0f}" for c in cells),
            "vs clean": score / clean if clean else float("nan"),
            "mean return over rounds": statistics.fmean(mean_over_rounds(c) for c in cells),
            "within 5%": "" if attack == "clean" else ("yes" if score >= 0.95 * clean
                                                       else "no"),
            "rejected per round": statistics.fmean(rejected) if rejected else 0.0,
            "run status": ", ".join(sorted({c.status for c in cells})),
        })
    columns = ["attack", "defence", "seeds", "final greedy return", "per seed", "vs clean",
               "within 5%", "mean return over rounds", "rejected per round", "run status"]
    markdown = markdown_table(table, columns)
    print(markdown)
    folder = write_results(
        "robustness",
        {"clients": CLIENTS, "attacker-partition": ATTACKER, "rounds": args.rounds,
         "local-steps": args.local_steps, "strategy": args.strategy, "summary": table,
         "cells": [{"attack": a, "defence": d, "name": c.name, "ok": c.ok,
                    "status": c.status, "score": c.score, "seconds": c.seconds,
                    "curve": curve(c.rows)} for (a, d), cells in groups.items()
                   for c in cells]},
        f"{markdown}\n\n![learning curves](robustness.png)\n\nCartPole-v1, {CLIENTS} devices, "
        f"{args.rounds} rounds x {args.local_steps} local env steps; device {ATTACKER} "
        "attacks every round. Final greedy return: the global model's last 3 checkpoints, "
        "10 episodes each, averaged over seeds. Mean return over rounds: the devices' "
        "federated greedy evaluation averaged over all rounds (nan: no device could evaluate "
        "the global model in any round). Undefended runs use "
        f"{args.contrast_seeds} seed(s).\n")
    plot(groups, RESULTS_ROOT / "robustness" / "robustness.png")
    print(f"results in {folder}")


if __name__ == "__main__":
    main()
