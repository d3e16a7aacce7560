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

from fedq.common.config import ConfigScalar, parse_assignment
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
from fedq.simulations.run import resolve_run_config

UTILITY_SHARE = 0.9  # the target: >= 90 % of the non-private return


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
    ``train-frequency=32``): the baseline differs only in DP."""
    items = [item for item in str(params["learner"]).split(",") if item.strip()]
    return dict(parse_assignment(item.strip()) for item in items)


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
    return [Setting(None, None)] + [Setting(n, c) for c in _floats(params["clip"])
                                    for n in _floats(params["noise"])]


def _plan(params: Mapping[str, Any]) -> list[tuple[Setting, int, Cell]]:
    resolve_run_config(learner_overrides(params), params["clients"])  # bad keys fail here
    return [(setting, seed, federated_cell(overrides_of(setting, seed, params),
                                           params["clients"]))
            for setting in settings(params) for seed in range(params["seeds"])]


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _plan(params)]


def device_epsilons(ledgers: list[list[list[float]]], delta: float) -> list[float]:
    """Each device's lifetime epsilon from the ledger on its disk (Opacus RDP)."""
    return [epsilon_of("rdp", delta, tuple((float(n), float(q), int(k)) for n, q, k in h))
            for h in ledgers]


def summarise_setting(setting: Setting, runs: list[dict[str, Any]], delta: float,
                      clients: int) -> dict[str, Any]:
    """One table row: epsilon over devices and seeds, return mean and spread over seeds."""
    for run in runs:
        if not run["ok"] or not run["rows"]:
            raise RuntimeError(f"privacy sweep: a {setting.name} run failed: {run['status']}")
    finals = [c["rows"][-1]["eval"]["eval-return-mean"] for c in runs]
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


def _floats(text: Any) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


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
    for row in private:
        row["vs non-private"] = row["return mean"] / baseline["return mean"]
    baseline["vs non-private"] = 1.0
    eligible = [r for r in private if r["epsilon max"] <= 8.0]
    best = max(eligible, key=lambda r: r["return mean"], default=None)
    budget = params["rounds"] * params["local-steps"]
    title = (f"{params['env-id']}, {params['clients']} devices, {params['seeds']} seeds, "
             f"{budget:,} env steps per device, delta {params['delta']:g}")
    columns = ["setting", "noise", "clip", "epsilon max", "epsilon mean", "return mean",
               "return min", "return max", "return std", "last-3-rounds return mean",
               "vs non-private", "env steps per device", "env steps total", "seeds"]
    met = best is not None and best["vs non-private"] >= UTILITY_SHARE
    verdict = "no setting reached epsilon <= 8" if best is None else (
        f"best setting with epsilon <= 8 per device: {best['setting']} (epsilon max "
        f"{best['epsilon max']:.2f}), return {best['return mean']:.1f} = "
        f"{best['vs non-private']:.0%} of the non-private {baseline['return mean']:.1f} "
        f"(target >= {UTILITY_SHARE:.0%}: {'met' if met else 'not met'})")
    learner = learner_overrides(params)
    text = "\n\n".join([
        f"Privacy-utility sweep: {title}; FedAvg every {params['local-steps']} env steps, "
        f"learning-starts {params['learning-starts']}, batch {params['batch-size']}"
        f"{', ' + str(learner) if learner else ''}. Return: the last round's federated "
        f"greedy return (mean over devices x {params['eval-episodes']} episodes), mean and "
        "min..max over seeds. Epsilon: each device's lifetime epsilon (Opacus RDP) "
        "recomputed from its on-disk ledger; max and mean over devices and seeds. Privacy "
        "unit: one transition of a device's replay buffer.", verdict])
    return Summary([baseline, *private], columns, text,
                   payload={"verdict": verdict},
                   plot=lambda path: plot(private, baseline, path, title))


_SWEEP = {"noise": "1.2,1.9,3.0", "clip": "0.3,1.0,3.0,10.0", "seeds": 3,
          "env-id": "CartPole-v1", "clients": 4, "rounds": 10, "local-steps": 2500,
          "learning-starts": 5000, "batch-size": 1024, "eval-episodes": 10, "delta": 1e-5,
          "learner": "train-frequency=32,learning-rate=0.003,target-update-interval=2500"}
_QUICK = {"noise": "1.2", "clip": "1.0", "seeds": 1, "clients": 2, "rounds": 1,
          "local-steps": 200, "learning-starts": 100, "batch-size": 32, "eval-episodes": 1}

register_benchmark(Benchmark(
    "privacy_sweep", "(epsilon, return) per DP-SGD noise multiplier x clip norm, 4 CartPole "
    "devices", defaults=_SWEEP, quick=_QUICK, cells=cells, summarise=summarise,
    plot_name="privacy_utility.png"))
register_benchmark(Benchmark(
    "privacy_sweep_50k", "the privacy sweep's best epsilon <= 8 setting over 50k env steps per "
    "device", defaults={**_SWEEP, "noise": "2.0", "clip": "3.0", "rounds": 20}, quick=_QUICK,
    cells=cells, summarise=summarise, plot_name="privacy_utility.png"))
