"""Device-level DP on the axes of :mod:`simulations.privacy_pretrain` (issue 20 item 4).

privacy_pretrain protects one transition of a device's data (DP-SGD on 4 devices). This
benchmark protects a whole device: the same public pretraining per seed, then DP-FedAvg
(:mod:`simulations.device_finetune`) over ``devices`` virtual devices whose physics are
privacy_pretrain's 4 device physics and draws around them, ``device-rate`` Poisson client
sampling, each update clipped to ``fed-clip``, Gaussian noise at the server chosen by the
RDP accountant *before* running for each target epsilon in ``epsilons`` at ``delta``
(with amplification by sampling, which assumes the sample is secret; the bound without
amplification is reported beside it). Its own non-private baseline (same sampling, no
clip, no noise) and the pretrained-only row are scored on privacy_pretrain's 4 device
physics with the same episodes, so the plot puts both privacy units on one pair of axes:
the transition-level points are read from privacy_pretrain's committed results.

    python -m fedq.simulations.bench privacy_pretrain_device --workers 2
    python -m fedq.simulations.bench privacy_pretrain_device --quick
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.device_finetune import DP_FEDAVG, SPREAD, noise_for_federation
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    Summary,
    cell_key,
    register_benchmark,
    results_by_cell,
)
from fedq.simulations.privacy_plan import EPSILON_TARGET, UTILITY_SHARE, floats
from fedq.simulations.privacy_pretrain import _PHYSICS, _row
from fedq.simulations.results_io import RESULTS_ROOT

TRANSITION_RESULTS = RESULTS_ROOT / "privacy_pretrain" / "results.json"

_CELL_PARAMS = ("env-id", "hidden-sizes", "eval-episodes", "pretrain-eval-episodes",
                "goal", "pretrain-steps", "pretrain-lr", "pretrain-eval-every",
                "pretrain-physics", "physics", "devices", "device-rate", "rounds",
                "local-steps", "lr", "batch-size", "train-frequency", "learning-starts",
                "target-update-interval", "tau", "explore", "fed-clip", "delta", "solve-at")


def planned_noise(epsilon: float, params: Mapping[str, Any]) -> float:
    """The server's noise multiplier for ``epsilon`` (with amplification at
    ``device-rate``, ``rounds`` rounds, ``delta``), fixed before any cell runs; rounded
    up to 0.001 so that the epsilon stays at or under the target."""
    noise = noise_for_federation(epsilon, params["device-rate"], params["rounds"],
                                 params["delta"])
    return math.ceil(noise * 1000) / 1000


Row = tuple[str, float | None]


def plan(params: Mapping[str, Any]) -> list[tuple[Row, Cell]]:
    """Per seed: the non-private FedAvg baseline, then DP-FedAvg per target epsilon."""
    base = {k: params[k] for k in _CELL_PARAMS}
    noises = {e: planned_noise(e, params) for e in floats(params["epsilons"])}
    out: list[tuple[Row, Cell]] = []
    for seed in range(params["seeds"]):
        out.append((("no-dp FedAvg", None), Cell(DP_FEDAVG, {**base, "seed": seed,
                                                              "noise": None})))
        for e, noise in noises.items():
            out.append(((f"DP-FedAvg epsilon {e:g}", e),
                        Cell(DP_FEDAVG, {**base, "seed": seed, "noise": noise})))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for _, cell in plan(params)]


def summarise_rows(params: Mapping[str, Any], done: Done) -> list[dict[str, Any]]:
    """Pretrained only, no-dp FedAvg, then each DP target, in privacy_pretrain's columns
    plus the epsilon without amplification and the clip rule's input (update norms)."""
    results = results_by_cell(done)
    groups: dict[Row, list[dict[str, Any]]] = {}
    noises: dict[Row, Any] = {}
    for row, cell in plan(params):
        if cell_key(cell) in results:
            groups.setdefault(row, []).append(results[cell_key(cell)])
            noises[row] = "-" if cell.params["noise"] is None else cell.params["noise"]
    goal = params["solve-at"]
    rows = []
    base_runs = groups.get(("no-dp FedAvg", None), [])
    if base_runs:
        pre = [{"final-return": r["pretrained-return"], "best-return": r["pretrained-return"],
                "solved-at": None, "epsilons": [0.0], "epsilon-no-amplification": 0.0}
               for r in base_runs]
        groups = {("pretrained only", 0.0): pre, **groups}
        noises[("pretrained only", 0.0)] = "-"
    for row, runs in groups.items():
        r = _row(row[0], runs, noises[row], goal)
        r["epsilon no-amplification"] = max(x["epsilon-no-amplification"] for x in runs)
        norms = [n for x in runs for n in x.get("median-update-norm-per-round", []) if n]
        r["median update norm"] = statistics.median(norms) if norms else None
        rows.append(r)
    base = next((r for r in rows if r["setting"] == "no-dp FedAvg"), None)
    for r in rows:
        if base is not None:
            r["vs non-private"] = r["final mean"] / base["final mean"]
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    """The best device-level DP row at epsilon <= 8 and its share of its own non-private
    FedAvg baseline's final return."""
    by = {r["setting"]: r for r in rows}
    base, pre = by.get("no-dp FedAvg"), by.get("pretrained only")
    eligible = [r for r in rows if r["noise"] != "-" and r["epsilon max"] <= EPSILON_TARGET]
    best = max(eligible, key=lambda r: r["final mean"], default=None)
    if base is None or best is None:
        return f"no DP-FedAvg setting at epsilon <= {EPSILON_TARGET:g} and baseline both ran"
    met = best["vs non-private"] >= UTILITY_SHARE
    text = (f"device-level, best at epsilon <= {EPSILON_TARGET:g}: {best['setting']} "
            f"(epsilon {best['epsilon max']:.2f} with amplification by sampling, "
            f"{best['epsilon no-amplification']:.1f} without), final {best['final mean']:.1f}"
            f" = {best['vs non-private']:.0%} of its non-private FedAvg baseline "
            f"{base['final mean']:.1f} (solved {base['solved']}); >= {UTILITY_SHARE:.0%}: "
            f"{'yes' if met else 'no'}")
    if pre is not None:
        text += (f". The pretrained net alone (epsilon 0) returns {pre['final mean']:.1f} "
                 f"({pre['vs non-private']:.0%})")
    return text


def transition_rows(path: Path = TRANSITION_RESULTS) -> list[dict[str, Any]]:
    """privacy_pretrain's committed rows (transition-level), [] if absent."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["summary"]


def plot(rows: list[dict[str, Any]], transition: list[dict[str, Any]], path: Path,
         title: str) -> None:
    """Final return vs epsilon for both privacy units (bars min..max over seeds), with
    each unit's non-private and pretrained-only references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.6, 5.4))
    units = (("transition-level DP-SGD (privacy_pretrain, 4 devices)", transition,
              "no-dp", "tab:blue"),
             ("device-level DP-FedAvg (this, virtual devices)", rows, "no-dp FedAvg",
              "tab:orange"))
    for label, of_unit, base_name, colour in units:
        points = sorted((r for r in of_unit if r["noise"] != "-" and r["epsilon max"]),
                        key=lambda r: r["epsilon max"])
        if points:
            ax.errorbar([r["epsilon max"] for r in points], [r["final mean"] for r in points],
                        yerr=[[r["final mean"] - r["final min"] for r in points],
                              [r["final max"] - r["final mean"] for r in points]],
                        marker="o", capsize=3, color=colour, label=f"{label}, final")
        by = {r["setting"]: r for r in of_unit}
        if base_name in by:
            ax.axhline(by[base_name]["final mean"], color=colour, ls="--", lw=1,
                       label=f"{base_name} (non-private), final")
            ax.axhline(UTILITY_SHARE * by[base_name]["final mean"], color=colour, ls=":",
                       lw=1, label=f"90% of {base_name}")
    pre = next((r for r in rows + transition if r["setting"] == "pretrained only"), None)
    if pre is not None:
        ax.axhline(pre["final mean"], color="tab:green", ls="-.", lw=1.5,
                   label="pretrained only (epsilon 0)")
    ax.axvline(EPSILON_TARGET, color="tab:red", ls=":", lw=1, label="epsilon = 8")
    ax.set_xscale("log")
    ax.set_xticks([2, 4, 8, 16, 32])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("epsilon (delta 1e-5); device-level: with amplification by sampling")
    ax.set_ylabel("greedy return on privacy_pretrain's 4 device physics")
    ax.set_ylim(0, 700)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="upper center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    rows = summarise_rows(params, done)
    transition = transition_rows()
    results = results_by_cell(done)
    pretrained: dict[int, set[float]] = {}
    for _, c in plan(params):
        if cell_key(c) in results:
            pretrained.setdefault(c.params["seed"], set()).add(
                round(results[cell_key(c)]["pretrained-return"], 6))
    same = all(len(v) == 1 for v in pretrained.values())
    line = verdict(rows)
    title = (f"{params['env-id']}: public pretraining, then fine-tuning on the devices' "
             f"physics, {params['seeds']} seeds;\ndevice-level: DP-FedAvg, "
             f"{params['devices']} devices, rate {params['device-rate']:g}, "
             f"{params['rounds']} rounds x {params['local-steps']:,} steps")
    text = "\n\n".join([
        f"Pretraining: as privacy_pretrain (public default physics, up to "
        f"{params['pretrain-steps']:,} env steps, best of {params['pretrain-eval-episodes']} "
        f"greedy episodes every {params['pretrain-eval-every']:,}). Population: "
        f"{params['devices']} virtual devices; device i is anchored on privacy_pretrain's "
        f"device i mod 4 ({params['physics']}): devices 0-3 are those physics exactly, every "
        f"other scales each of its anchor's pole length, cart mass and force by its own "
        f"U({1 - SPREAD:g}, {1 + SPREAD:g}) draw. Each round Poisson-samples devices at "
        f"{params['device-rate']:g}; a sampled device starts fresh from the global net, "
        f"trains {params['local-steps']:,} env steps (lr {params['lr']:g} decaying linearly "
        f"to 0 over the rounds, batch {params['batch-size']} every "
        f"{params['train-frequency']} step(s) from step {params['learning-starts']}, target "
        f"Polyak tau {params['tau']:g}, exploration {params['explore']:g}); DP: update "
        f"clipped to {params['fed-clip']:g}, N(0, (noise x clip)^2) added to the sum, "
        f"divided by the expected {params['devices'] * params['device-rate']:g} devices; "
        f"noise planned by the RDP accountant for each target epsilon at delta "
        f"{params['delta']:g} with amplification by sampling (valid only if the sample is "
        f"secret); 'epsilon no-amplification' is the bound at rate 1. No-dp FedAvg: same "
        f"sampling, plain mean of the sampled updates, no clip, no noise. Return: the global "
        f"net's greedy return on privacy_pretrain's 4 device physics ({params['eval-episodes']}"
        f" episodes each, the same evaluation seeds) after every round; final = last round, "
        f"best = best round, solved = >= {params['solve-at']:g} on 3 rounds in a row; "
        f"'median env steps (all devices) to solved' counts every sampled device's steps. "
        f"Pretrained net identical across a seed's cells: {'yes' if same else 'NO'}.",
        line])
    for r in rows:
        r["median env steps (all devices) to solved"] = r.pop(
            "median steps/device to solved")
    columns = ["setting", "noise", "epsilon max", "epsilon no-amplification", "final mean",
               "final min", "final max", "best mean", "best min", "solved",
               "median env steps (all devices) to solved", "final at goal",
               "vs non-private", "median update norm", "seeds"]
    return Summary(rows, columns, text, payload={"verdict": line, "transition-level":
                                                 str(TRANSITION_RESULTS.relative_to(
                                                     RESULTS_ROOT.parent.parent))},
                   plot=lambda path: plot(rows, transition, path, title))


_DEFAULTS: dict[str, Any] = {
    "env-id": "CartPole-v1", "hidden-sizes": "64,64", "seeds": 5, "eval-episodes": 5,
    "pretrain-eval-episodes": 20, "goal": 500.0, "pretrain-steps": 150000,
    "pretrain-lr": 0.0005, "pretrain-eval-every": 5000, "pretrain-physics": 4,
    "physics": _PHYSICS, "devices": 100, "device-rate": 0.1, "rounds": 24,
    "local-steps": 1000, "lr": 0.0001, "batch-size": 64, "train-frequency": 1,
    "learning-starts": 200, "target-update-interval": 1, "tau": 0.005, "explore": 0.05,
    "fed-clip": 0.3, "delta": 1e-5, "solve-at": 475.0, "epsilons": "32,8,4"}
_QUICK = {"seeds": 1, "eval-episodes": 1, "pretrain-eval-episodes": 1, "pretrain-steps": 600,
          "pretrain-eval-every": 300, "devices": 8, "device-rate": 0.5, "rounds": 2,
          "local-steps": 100, "batch-size": 16, "learning-starts": 32, "epsilons": "8",
          "pretrain-physics": 0}

BENCHMARK = register_benchmark(Benchmark(
    "privacy_pretrain_device", "privacy_pretrain's pretraining and device physics with "
    "device-level DP: DP-FedAvg over virtual devices with client sampling",
    defaults=_DEFAULTS, quick=_QUICK, cells=cells, summarise=summarise,
    plot_name="epsilon_vs_return.png"))
register_benchmark(Benchmark(
    "privacy_pretrain_device_1000", "privacy_pretrain_device with 1,000 virtual devices "
    "sampled at 0.05 (50 per round, 5x the compute): the server noise on the mean update is "
    "1/5 of the 100-device run's per unit noise multiplier", defaults={
        **_DEFAULTS, "seeds": 3, "devices": 1000, "device-rate": 0.05, "epsilons": "8"},
    quick=_QUICK, cells=cells, summarise=summarise, plot_name="epsilon_vs_return.png"))
