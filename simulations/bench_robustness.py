"""Do update validation and robust aggregation hold off bad devices? 5 CartPole clients.

Scenarios, each a real federated run in Flower's simulation engine:

- clean: 5 honest devices, FedAvg (the reference);
- nan: device 4 sends all-NaN weights every round;
- noise: device 4 sends the global weights plus N(0, 10^2) noise per weight (an update
  norm ~200x an honest one).

The bad device is made by the simulated attacker (:mod:`simulations.attacks`, a client
mod only simulations add; the product has no attack setting). Each attack runs twice: plain
FedAvg with ``validate-updates = false`` (the contrast: what happens without the
defences) and ``validate-updates = true`` with a robust strategy (parameter
``strategy``, default FedTrimmedAvg). The score is the mean greedy return of the global
model's last 3 checkpoints, 10 episodes each (:mod:`simulations.federated_cell`); target:
defended runs within 5% of the clean run. Five seeds: at this budget the final return spreads
over seeds (77..322) by more than the comparison, and three seeds once put the defended runs at
78% of clean and once at 153% (docs/benchmarks.md).

    python -m fedq.simulations.bench robustness             # the committed results
    python -m fedq.simulations.bench robustness --set seeds=2

Each run is a ``federated-run`` cell of :mod:`simulations.harness` (cached under
``runs/harness/``, shared with ``communication``, whose fp32 runs are the clean ones).
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedq.simulations.attacks import Attack
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

CLIENTS = 5
ATTACKER = CLIENTS - 1
ATTACKS = ("clean", "nan", "noise")
STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")


def plan(strategy: str) -> list[tuple[str, str, dict]]:
    """(attack, defence label, config overrides) of every scenario."""
    contrast = {"strategy": "fedavg", "validate-updates": False}
    defended = {"strategy": strategy, "validate-updates": True}
    cells = [("clean", "fedavg", {"strategy": "fedavg"})]
    for attack in ("nan", "noise"):
        cells += [(attack, "fedavg, no validation", contrast),
                  (attack, f"validation + {strategy}", defended)]
    return cells


def cell_config(defence: dict, seed: int, params: Mapping[str, Any]) -> dict:
    """A run's config overrides (shared with bench_communication: its fp32 cell is the
    clean FedAvg cell)."""
    return {"seed": seed, "local-steps": params["local-steps"],
            "num-server-rounds": params["rounds"], "eval-episodes": params["eval-episodes"],
            **defence}


def cell_attack(attack: str) -> Attack | None:
    """Device ``ATTACKER`` sends ``attack``'s bad weights every round (None: clean)."""
    return None if attack == "clean" else Attack(attack, (ATTACKER,))


def _labels(params: Mapping[str, Any]) -> list[tuple[str, str, int, Cell]]:
    """(attack, defence, seed, cell) of every run, seed-major (early results first)."""
    if params["strategy"] not in STRATEGIES:
        raise ValueError(f"robustness: strategy must be one of {STRATEGIES}")
    out = []
    for seed in range(max(params["seeds"], params["contrast-seeds"])):
        for attack, label, defence in plan(params["strategy"]):
            undefended = defence.get("validate-updates") is False
            if seed >= (params["contrast-seeds"] if undefended else params["seeds"]):
                continue
            out.append((attack, label, seed, federated_cell(
                cell_config(defence, seed, params), CLIENTS, cell_attack(attack))))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _labels(params)]


def plot(groups: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5 * len(ATTACKS), 3.8), sharey=True)
    for ax, attack in zip(axes, ATTACKS, strict=True):
        for (group_attack, defence), runs in groups.items():
            if group_attack not in (attack, "clean"):
                continue
            steps, _ = curve(runs[0]["rows"])
            with warnings.catch_warnings():  # all-NaN rounds: no device could evaluate
                warnings.simplefilter("ignore", RuntimeWarning)
                returns = np.nanmean([curve(c["rows"])[1] for c in runs], axis=0) \
                    if all(len(c["rows"]) == len(runs[0]["rows"]) for c in runs) else curve(
                        runs[0]["rows"])[1]
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


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = results_by_cell(done)
    groups: dict[tuple[str, str], list[dict]] = {}
    for attack, label, seed, cell in _labels(params):
        if cell_key(cell) in results:
            groups.setdefault((attack, label), []).append({**results[cell_key(cell)],
                                                           "seed": seed})
    clean_runs = groups.get(("clean", "fedavg"), [])
    clean = statistics.fmean(c["score"] for c in clean_runs) if clean_runs else float("nan")
    table = []
    for (attack, label), runs in groups.items():
        score = statistics.fmean(c["score"] for c in runs)
        rejected = [r["updates"]["rejected"] for c in runs for r in c["rows"] if "updates" in r]
        table.append({
            "attack": attack, "defence": label, "seeds": len(runs),
            "final greedy return": score,
            "per seed": ", ".join(f"{c['score']:.0f}" for c in runs),
            "vs clean": score / clean if clean else float("nan"),
            "mean return over rounds": statistics.fmean(mean_over_rounds(c["rows"])
                                                        for c in runs),
            "within 5%": "" if attack == "clean" else ("yes" if score >= 0.95 * clean
                                                       else "no"),
            "rejected per round": statistics.fmean(rejected) if rejected else 0.0,
            "run status": ", ".join(sorted({c["status"] for c in runs})),
        })
    columns = ["attack", "defence", "seeds", "final greedy return", "per seed", "vs clean",
               "within 5%", "mean return over rounds", "rejected per round", "run status"]
    text = (f"CartPole-v1, {CLIENTS} devices, {params['rounds']} rounds x "
            f"{params['local-steps']} local env steps; device {ATTACKER} attacks every round. "
            "Final greedy return: the global model's last 3 checkpoints, 10 episodes each, "
            "averaged over seeds. Mean return over rounds: the devices' federated greedy "
            "evaluation averaged over all rounds (nan: no device could evaluate the global "
            "model in any round). Undefended runs use "
            f"{params['contrast-seeds']} seed(s).")
    return Summary(table, columns, text, payload={
        "clients": CLIENTS, "attacker-partition": ATTACKER,
        "runs": [{"attack": a, "defence": d, "seed": c["seed"], "ok": c["ok"],
                  "status": c["status"], "score": c["score"], "seconds": c["seconds"],
                  "curve": curve(c["rows"])} for (a, d), runs in groups.items()
                 for c in runs]},
        plot=lambda path: plot(groups, path))


BENCHMARK = register_benchmark(Benchmark(
    "robustness", "update validation and robust aggregation against a NaN or noise attacker, "
    "5 CartPole devices",
    defaults={"seeds": 5, "contrast-seeds": 1, "rounds": 12, "local-steps": 2500,
              "eval-episodes": 5, "strategy": "fedtrimmedavg"},
    quick={"seeds": 1, "rounds": 1, "local-steps": 100, "eval-episodes": 1},
    cells=cells, summarise=summarise, plot_name="robustness.png"))
