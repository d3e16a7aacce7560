"""Privacy-utility sweep: device-side DP-SGD noise multipliers x clipping norms x seeds.

Every cell is a real federated run in Flower's simulation engine (a ``federated-run`` cell of
:mod:`simulations.harness`, i.e. ``fedq-simulate``) with the same scenario and the same
env-step budget per device (``rounds`` x ``local-steps``), plus the non-private baseline
with that budget. For each cell the sweep reads

- every device's final lifetime epsilon (at ``delta``), recomputed here with Opacus's
  accountant from the ledger the device left on its disk (``privacy.json``), not from
  what the server was told;
- the final federated greedy return: the last round's mean over the devices' greedy
  evaluation episodes of the global model (and, less noisy, the mean of the last three
  rounds).

Seeds are summarised as mean and spread (min..max); the plot is return vs epsilon (log x).
Two sweeps are registered: ``privacy_sweep`` (the noise x clip grid, 25k env steps per
device) and ``privacy_sweep_50k`` (the best setting over 50k). Finished cells are cached by
the harness; an interrupted cell starts again from scratch (a resumed one would repeat a
round and spend extra epsilon and env steps), and widening the grid runs only new cells.

    python -m fedq.simulations.bench privacy_sweep                   # the committed results
    python -m fedq.simulations.bench privacy_sweep --set noise=0.8,1.2 --set seeds=2
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigScalar, FedqConfig, parse_assignment
from fedq.common.privacy import epsilon_of
from fedq.simulations.federated_cell import federated_cell
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    Summary,
    cell_key,
    register_benchmark,
    results_by_cell,
)
from fedq.simulations.privacy_plan import (
    UTILITY_SHARE,
    floats,
    noise_for_epsilon,
    planned_epsilon,
)
from fedq.simulations.results_io import curve_summary
from fedq.simulations.run import resolve_run_config

GOAL = 475.0  # CartPole-v1: solved at 3 rounds in a row at or above it
PLANNED_EPSILONS = (8.0, 4.0, 2.0)  # the text names the noise that reaches each


@dataclass(frozen=True)
class Setting:
    """One row of the table: a (noise multiplier, clip norm), or the baseline (None)."""

    noise: float | None
    clip: float | None

    @property
    def name(self) -> str:
        return "no-dp" if self.noise is None else f"noise{self.noise:g}-clip{self.clip:g}"


def learner_overrides(params: Mapping[str, Any]) -> dict[str, ConfigScalar]:
    """``learner``: comma-separated ``KEY=VALUE`` settings for every cell, DP or not (e.g.
    ``train-frequency=32``): the baseline differs only in DP. A part without ``=``
    continues the value before it, so ``hidden-sizes=32,32`` stays one setting."""
    items: list[str] = []
    for part in (p.strip() for p in str(params["learner"]).split(",")):
        if items and part and "=" not in part:
            items[-1] += "," + part
        elif part:
            items.append(part)
    return dict(parse_assignment(item) for item in items)


def overrides_of(setting: Setting, seed: int, params: Mapping[str, Any]
                 ) -> dict[str, ConfigScalar]:
    base: dict[str, ConfigScalar] = {
        "env-id": params["env-id"], "seed": seed, "num-server-rounds": params["rounds"],
        "local-steps": params["local-steps"], "learning-starts": params["learning-starts"],
        "batch-size": params["batch-size"], "eval-episodes": params["eval-episodes"],
        **learner_overrides(params)}
    if setting.noise is None:
        return base
    return {**base, "dp-enabled": True, "dp-noise-multiplier": setting.noise,
            "dp-clip-norm": float(setting.clip), "dp-delta": params["delta"]}


def settings(params: Mapping[str, Any]) -> list[Setting]:
    """The non-private baseline, then every (noise, clip) of the grid."""
    return [Setting(None, None)] + [Setting(n, c) for c in floats(params["clip"])
                                    for n in floats(params["noise"])]


def _plan(params: Mapping[str, Any]) -> list[tuple[Setting, int, Cell]]:
    resolve_run_config(learner_overrides(params), params["clients"])  # bad keys fail here
    return [(setting, seed, federated_cell(overrides_of(setting, seed, params),
                                           params["clients"]))
            for setting in settings(params) for seed in range(params["seeds"])]


def planning_config(params: Mapping[str, Any]) -> FedqConfig:
    """The config every DP cell of the sweep runs with (its noise aside): what the
    accountant's plan of the run's sample rates reads."""
    return resolve_run_config(overrides_of(Setting(1.0, 1.0), 0, params),
                              params["clients"])[0]


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _plan(params)]


def device_epsilons(ledgers: list[list[list[float]]], delta: float) -> list[float]:
    """Each device's lifetime epsilon from the ledger on its disk (Opacus RDP)."""
    return [epsilon_of("rdp", delta, tuple((float(n), float(q), int(k)) for n, q, k in h))
            for h in ledgers]


def summarise_setting(setting: Setting, runs: list[dict[str, Any]], delta: float,
                      clients: int) -> dict[str, Any]:
    """One table row: epsilon over devices and seeds; the final return (the last round's
    federated greedy return) mean and spread over seeds, the best round's, and how many
    seeds solved (3 rounds in a row at the goal)."""
    for run in runs:
        if not run["ok"] or not run["rows"]:
            raise RuntimeError(f"privacy sweep: a {setting.name} run failed: {run['status']}")
    curves = [curve_summary([(r["env-steps-per-client-total"], r["eval"]["eval-return-mean"])
                             for r in c["rows"]], GOAL) for c in runs]
    finals = [c["final-return"] for c in curves]
    solved = [c["solved-at"] for c in curves if c["solved-at"] is not None]
    last3 = [statistics.fmean(r["eval"]["eval-return-mean"] for r in c["rows"][-3:])
             for c in runs]
    steps = runs[0]["rows"][-1]["env-steps-per-client-total"]
    row: dict[str, Any] = {
        "setting": setting.name,
        "noise": "-" if setting.noise is None else setting.noise,
        "clip": "-" if setting.clip is None else setting.clip,
        "seeds": len(runs),
        "return mean": statistics.fmean(finals),
        "return min": min(finals),
        "return max": max(finals),
        "return std": statistics.pstdev(finals),
        "last-3-rounds return mean": statistics.fmean(last3),
        "best return mean": statistics.fmean(c["best-return"] for c in curves),
        "solved": f"{len(solved)}/{len(runs)}",
        "median steps/device to solved": statistics.median(solved) if solved else None,
        "env steps per device": steps,
        "env steps total": steps * clients,
        "per-seed returns": finals,
    }
    if setting.noise is not None:
        epsilons = [e for c in runs for e in device_epsilons(c["ledgers"], delta)]
        row["epsilon max"] = max(epsilons)
        row["epsilon mean"] = statistics.fmean(epsilons)
    else:
        row["epsilon max"] = row["epsilon mean"] = math.inf  # no DP, no guarantee
    return row


def plot(rows: list[dict[str, Any]], baseline: dict[str, Any], path: Path,
         title: str) -> None:
    """Return vs epsilon (max over devices), error bars = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for clip in sorted({r["clip"] for r in rows}):
        points = sorted((r for r in rows if r["clip"] == clip), key=lambda r: r["epsilon max"])
        x = [r["epsilon max"] for r in points]
        y = [r["return mean"] for r in points]
        err = [[r["return mean"] - r["return min"] for r in points],
               [r["return max"] - r["return mean"] for r in points]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"DP-SGD, clip {clip:g}")
        for r in points:
            ax.annotate(f"noise {r['noise']:g}", (r["epsilon max"], r["return mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(baseline["return mean"], color="k", ls="--", label="non-private")
    ax.axhline(UTILITY_SHARE * baseline["return mean"], color="grey", ls=":",
               label=f"{UTILITY_SHARE:.0%} of non-private")
    ax.axvline(8.0, color="tab:red", ls=":", lw=1, label="epsilon = 8")
    ax.set_xscale("log")
    ax.set_xlabel("final epsilon per device (max over devices and seeds)")
    ax.set_ylabel("final federated greedy return")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = results_by_cell(done)
    by_setting: dict[Setting, list[dict[str, Any]]] = {}
    for setting, _, cell in _plan(params):
        if cell_key(cell) in results:
            by_setting.setdefault(setting, []).append(results[cell_key(cell)])
    if Setting(None, None) not in by_setting:
        raise ValueError("privacy sweep: the non-private baseline has not run yet")
    rows = [summarise_setting(s, runs, params["delta"], params["clients"])
            for s, runs in by_setting.items()]
    baseline, private = rows[0], rows[1:]
    budget = params["rounds"] * params["local-steps"]
    config = planning_config(params)
    for row in private:
        row["vs non-private"] = row["return mean"] / baseline["return mean"]
        row["epsilon planned"] = planned_epsilon(row["noise"], config, budget)
    baseline["vs non-private"] = 1.0
    baseline["epsilon planned"] = math.inf
    eligible = [r for r in private if r["epsilon max"] <= 8.0]
    best = max(eligible, key=lambda r: r["return mean"], default=None)
    title = (f"{params['env-id']}, {params['clients']} devices, {params['seeds']} seeds, "
             f"{budget:,} env steps per device, delta {params['delta']:g}")
    columns = ["setting", "noise", "clip", "epsilon planned", "epsilon max", "epsilon mean",
               "return mean", "return min", "return max", "return std",
               "last-3-rounds return mean", "best return mean", "solved",
               "median steps/device to solved", "vs non-private", "env steps per device",
               "env steps total", "seeds"]
    met = best is not None and best["vs non-private"] >= UTILITY_SHARE
    verdict = "no setting reached epsilon <= 8" if best is None else (
        f"best setting with epsilon <= 8 per device: {best['setting']} (epsilon max "
        f"{best['epsilon max']:.2f}), return {best['return mean']:.1f} = "
        f"{best['vs non-private']:.0%} of the non-private {baseline['return mean']:.1f} "
        f"(target >= {UTILITY_SHARE:.0%}: {'met' if met else 'not met'})")
    learner = learner_overrides(params)
    plan = ", ".join(f"noise {noise_for_epsilon(e, config, budget):.3f} -> epsilon {e:g}"
                     for e in PLANNED_EPSILONS)
    text = "\n\n".join([
        f"Privacy-utility sweep: {title}; FedAvg every {params['local-steps']} env steps, "
        f"learning-starts {params['learning-starts']}, batch {params['batch-size']}"
        f"{', ' + str(learner) if learner else ''}. Return: the last round's federated "
        f"greedy return (mean over devices x {params['eval-episodes']} episodes), mean and "
        "min..max over seeds. Epsilon: each device's lifetime epsilon (Opacus RDP) "
        "recomputed from its on-disk ledger; max and mean over devices and seeds. Privacy "
        "unit: one transition of a device's replay buffer. Solved: the federated greedy "
        f"return >= {GOAL:g} on 3 rounds in a row (median env steps per device over the "
        "seeds that solved); best: the best round's return, mean over seeds.",
        f"Planned before running (RDP accountant on this schedule of sample rates, batch / "
        f"buffer length at each update, {budget:,} env steps per device): {plan}.",
        verdict])
    return Summary([baseline, *private], columns, text,
                   payload={"verdict": verdict},
                   plot=lambda path: plot(private, baseline, path, title))


_SWEEP = {"noise": "0.8,1.1", "clip": "1.0", "seeds": 3,
          "env-id": "CartPole-v1", "clients": 4, "rounds": 60, "local-steps": 2500,
          "learning-starts": 10000, "batch-size": 64, "eval-episodes": 6, "delta": 1e-5,
          "learner": "backend=numpy"}
# privacy_sweep's settings before the stable learner (torch, 25k steps per device, batch
# 1024 every 32 steps): what privacy_sweep_50k's committed results ran with
_SWEEP_2026_11 = {"noise": "1.2,1.9,3.0", "clip": "0.3,1.0,3.0,10.0", "seeds": 3,
                  "env-id": "CartPole-v1", "clients": 4, "rounds": 10, "local-steps": 2500,
                  "learning-starts": 5000, "batch-size": 1024, "eval-episodes": 10,
                  "delta": 1e-5, "learner": "train-frequency=32,learning-rate=0.003,"
                  "target-update-interval=2500"}
_QUICK = {"noise": "1.2", "clip": "1.0", "seeds": 1, "clients": 2, "rounds": 1,
          "local-steps": 200, "learning-starts": 100, "batch-size": 32, "eval-episodes": 1}

register_benchmark(Benchmark(
    "privacy_sweep", "(epsilon, return) per DP-SGD noise multiplier x clip norm, 4 CartPole "
    "devices", defaults=_SWEEP, quick=_QUICK, cells=cells, summarise=summarise,
    plot_name="privacy_utility.png"))
register_benchmark(Benchmark(
    "privacy_sweep_50k", "the privacy sweep's best epsilon <= 8 setting over 50k env steps per "
    "device (the 2026-11-25 settings, before the stable-learning defaults)",
    defaults={**_SWEEP_2026_11, "noise": "2.0", "clip": "3.0", "rounds": 20}, quick=_QUICK,
    cells=cells, summarise=summarise, plot_name="privacy_utility.png"))
register_benchmark(Benchmark(
    "privacy_sweep_b256", "the privacy sweep's lever of fewer, larger updates: batch 256 every "
    "4 env steps (its own non-private baseline), noise 1.2 (epsilon 7.8)",
    defaults={**_SWEEP, "noise": "1.2", "batch-size": 256,
              "learner": "backend=numpy,train-frequency=4"}, quick=_QUICK,
    cells=cells, summarise=summarise, plot_name="privacy_utility.png"))
register_benchmark(Benchmark(
    "privacy_sweep_h32", "the privacy sweep's lever of fewer weights: a 32,32 Q-network (1,282 "
    "weights instead of 4,610; its own non-private baseline), noise 0.8 (epsilon 7.6)",
    defaults={**_SWEEP, "noise": "0.8", "learner": "backend=numpy,hidden-sizes=32,32"},
    quick=_QUICK, cells=cells, summarise=summarise, plot_name="privacy_utility.png"))
