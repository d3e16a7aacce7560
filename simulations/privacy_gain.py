"""Private learning that pays: public pretraining, then private fine-tuning on devices.

The default-physics simulator carries no device data, so the server may train on it for
free (no privacy cost). Devices differ in physics (:mod:`common.physics`); each then
fine-tunes the pretrained Q-network on its own env under DP. Two privacy units, on the
same axes (epsilon at ``delta`` vs the greedy return on the devices' own physics):

- **transition-level** (cell kind ``privacy-gain-device``): one device fine-tunes with
  DP-SGD (fedq's numpy learner, :class:`common.numpy_learner.PrivateNumpyDQNLearner`,
  Poisson-sampled batches, RDP ledger of :mod:`common.rdp`); epsilon is the device's own
  ledger's. The baseline is the same fine-tuning without DP (same steps, lr, batch).
- **device-level** (cell kind ``privacy-gain-federation``): DP-FedAvg (McMahan et al.
  2018) over ``devices`` virtual devices with heterogeneous physics: each round samples
  every device independently with probability ``device-rate``, each sampled device
  fine-tunes locally (no local DP) and its update ``w_i - w_global`` is clipped to
  ``fed-clip``; the server adds N(0, (noise x clip)^2) to the sum and divides by the
  *expected* number of sampled devices (the fixed denominator keeps the sensitivity at
  one clip norm). Epsilon: the subsampled Gaussian's RDP (fedq's :func:`common.privacy.
  epsilon_of`, Opacus's arithmetic) at sample rate ``device-rate`` for ``rounds`` steps,
  i.e. with amplification by Poisson sampling of devices (valid only if the sample is
  secret from the adversary: in this simulation it comes from a seeded generator);
  the no-amplification bound (rate 1, what :func:`server.central_dp.central_dp_report`
  reports for a live run) is given beside it.

Every fine-tuning cell starts from the same public pretraining of its seed (cell kind
``privacy-gain-pretrain``: DQN on default physics, greedy evaluation every
``pretrain-eval-every`` steps, the best evaluated weights kept), which the fine-tuning cells
read from its workdir (the benchmark is therefore not ``parallel``).

    python -m fedq.simulations.bench privacy_gain
    python -m fedq.simulations.bench privacy_gain --quick
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from fedq.simulations.private_finetune import DEVICE, FEDERATION
from fedq.simulations.public_pretrain import SHARED_PARAMS, pretrain_cell


def _device_params(params: Mapping[str, Any], seed: int, noise: float | None,
                   steps: int) -> dict[str, Any]:
    return {**{k: params[k] for k in SHARED_PARAMS}, "seed": seed, "noise": noise,
            "clip": params["clip"], "delta": params["delta"], "steps": steps,
            "physics": params["device-physics"], "lr": params["lr"],
            "batch-size": params["batch-size"], "train-frequency": params["train-frequency"],
            "target-update-interval": params["target-update-interval"],
            "explore": params["explore"]}


def _federation_params(params: Mapping[str, Any], seed: int, noise: float | None
                       ) -> dict[str, Any]:
    return {**{k: params[k] for k in SHARED_PARAMS}, "seed": seed, "noise": noise,
            "fed-clip": params["fed-clip"], "delta": params["delta"],
            "devices": params["devices"], "device-rate": params["device-rate"],
            "rounds": params["rounds"], "local-steps": params["local-steps"],
            "eval-devices": params["eval-devices"], "lr": params["fed-lr"],
            "batch-size": params["batch-size"], "train-frequency": params["train-frequency"],
            "target-update-interval": params["target-update-interval"],
            "explore": params["explore"]}


Row = tuple[str, str, float | None]  # (privacy unit, setting name, noise)


def plan(params: Mapping[str, Any]) -> list[tuple[Row, Cell]]:
    """Per seed: pretraining, then the device cells (non-private fine-tuning, DP-SGD per
    noise) and the federation cells (non-private FedAvg, DP-FedAvg per noise).
    Pretraining comes first: the others read its weights. Each non-private cell also
    scores the pretrained net before it fine-tunes (the "pretrained only" rows)."""
    out: list[tuple[Row, Cell]] = []
    for seed in range(params["seeds"]):
        base = {**params, "seed": seed}
        out.append((("public", "pretrained", None), pretrain_cell(base)))
        for noise in [None, *floats(params["noise"])]:
            name = "no-dp" if noise is None else f"noise {noise:g}"
            out.append((("transition", name, noise),
                        Cell(DEVICE, _device_params(params, seed, noise, params["steps"]))))
        for noise in [None, *floats(params["fed-noise"])]:
            name = "no-dp" if noise is None else f"noise {noise:g}"
            out.append((("device", name, noise),
                        Cell(FEDERATION, _federation_params(params, seed, noise))))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for _, cell in plan(params)]


# --- summary ----------------------------------------------------------------------------
def summarise_rows(params: Mapping[str, Any], done: Done) -> list[dict[str, Any]]:
    """One row per (privacy unit, setting): epsilon and return over seeds."""
    results = results_by_cell(done)
    groups: dict[Row, list[dict[str, Any]]] = {}
    for row, cell in plan(params):
        if cell_key(cell) in results and row[0] != "public":
            groups.setdefault(row, []).append(results[cell_key(cell)])
            if row[1] == "no-dp":  # the pretrained net as is: no device data touched
                groups.setdefault((row[0], "pretrained only", None), []).append({
                    "return": results[cell_key(cell)]["pretrained-return"], "epsilon": 0.0,
                    "epsilon-no-amplification": 0.0})
    order = ["pretrained only", "no-dp"]
    groups = dict(sorted(groups.items(), key=lambda g: (
        g[0][0] != "transition", order.index(g[0][1]) if g[0][1] in order else 2)))
    rows = []
    for (unit, name, noise), runs in groups.items():
        returns = [r["return"] for r in runs]
        eps = [r["epsilon"] for r in runs]
        row = {"privacy unit": unit, "setting": name, "noise": "-" if noise is None else noise,
               "epsilon max": max(eps), "return median": statistics.median(returns),
               "return mean": statistics.fmean(returns), "return min": min(returns),
               "return max": max(returns), "seeds": len(runs), "per-seed returns": returns}
        if unit == "device":
            row["epsilon no-amplification"] = max(r["epsilon-no-amplification"] for r in runs)
        rows.append(row)
    for unit in ("transition", "device"):
        base = next((r for r in rows if r["privacy unit"] == unit and r["setting"] == "no-dp"),
                    None)
        for r in rows:
            if r["privacy unit"] == unit and base is not None:
                r["vs non-private"] = r["return mean"] / base["return mean"]
    return rows


def verdicts(rows: list[dict[str, Any]], goal: float) -> list[str]:
    """Per privacy unit: the best DP setting at epsilon <= 8, its share of the non-private
    return, and the two conditions that share is read under: whether the non-private
    baseline itself solves the env (mean >= 95 % of ``goal``, 475 on CartPole-v1) and how
    the pretrained net alone (epsilon 0, no device data) compares."""
    out = []
    for unit in ("transition", "device"):
        of_unit = {r["setting"]: r for r in rows if r["privacy unit"] == unit}
        base, pre = of_unit.get("no-dp"), of_unit.get("pretrained only")
        eligible = [r for r in of_unit.values() if r["noise"] != "-"
                    and r["epsilon max"] <= EPSILON_TARGET]
        best = max(eligible, key=lambda r: r["return mean"], default=None)
        if base is None or best is None:
            out.append(f"{unit}-level: no DP setting at epsilon <= {EPSILON_TARGET:g} ran")
            continue
        met = best["vs non-private"] >= UTILITY_SHARE
        solves = base["return mean"] >= 0.95 * goal
        text = (f"{unit}-level: best at epsilon <= {EPSILON_TARGET:g}: {best['setting']} "
                f"(epsilon {best['epsilon max']:.2f}), return {best['return mean']:.1f} = "
                f"{best['vs non-private']:.0%} of non-private {base['return mean']:.1f} "
                f"(>= {UTILITY_SHARE:.0%}: {'yes' if met else 'no'}); the non-private "
                f"baseline {'solves' if solves else 'does not solve'} the env (mean >= "
                f"{0.95 * goal:g}), so the issue's target is "
                f"{'met' if met and solves else 'not met'}")
        if pre is not None:
            text += (f"; the pretrained net alone (epsilon 0) returns "
                     f"{pre['return mean']:.1f}")
        out.append(text)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Return vs epsilon for both privacy units; non-private lines dashed, bars min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    colours = {"transition": "tab:blue", "device": "tab:orange"}
    for unit, colour in colours.items():
        points = sorted((r for r in rows if r["privacy unit"] == unit and r["noise"] != "-"),
                        key=lambda r: r["epsilon max"])
        if points:
            y = [r["return mean"] for r in points]
            err = [[r["return mean"] - r["return min"] for r in points],
                   [r["return max"] - r["return mean"] for r in points]]
            ax.errorbar([r["epsilon max"] for r in points], y, yerr=err, marker="o",
                        capsize=3, color=colour, label=f"{unit}-level DP")
        base = next((r for r in rows if r["privacy unit"] == unit and r["setting"] == "no-dp"),
                    None)
        if base is not None:
            ax.axhline(base["return mean"], color=colour, ls="--", lw=1,
                       label=f"{unit}: non-private")
            ax.axhline(UTILITY_SHARE * base["return mean"], color=colour, ls=":", lw=1,
                       label=f"{unit}: 90% of non-private")
        pre = next((r for r in rows if r["privacy unit"] == unit
                    and r["setting"] == "pretrained only"), None)
        if pre is not None:
            ax.axhline(pre["return mean"], color=colour, ls="-.", lw=1.5, alpha=0.6,
                       label=f"{unit}: pretrained only (epsilon 0)")
    ax.axvline(EPSILON_TARGET, color="tab:red", ls=":", lw=1, label="epsilon = 8")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("epsilon (delta 1e-5), max over seeds")
    ax.set_ylabel("greedy return on the devices' physics")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    rows = summarise_rows(params, done)
    results = results_by_cell(done)
    pretrain = [results[cell_key(c)] for (u, _, _), c in plan(params)
                if u == "public" and cell_key(c) in results]
    lines = verdicts(rows, params["goal"])
    title = (f"{params['env-id']}, {params['seeds']} seeds; transition: {params['steps']:,} "
             f"steps on one device; device: DP-FedAvg, {params['devices']} devices, rate "
             f"{params['device-rate']:g}, {params['rounds']} rounds")
    text = "\n\n".join([
        f"Public pretraining (default physics, up to {params['pretrain-steps']:,} env steps, "
        f"best of greedy evaluations every {params['pretrain-eval-every']:,}): best returns "
        f"{[round(p['best-return'], 1) for p in pretrain]} after "
        f"{[p['env-steps'] for p in pretrain]} steps. Transition-level device physics "
        f"{params['device-physics']}; fine-tuning {params['steps']:,} env steps, lr "
        f"{params['lr']:g}, batch {params['batch-size']} (Poisson rate batch/buffer), an "
        f"update every {params['train-frequency']} steps, clip {params['clip']:g}, "
        f"exploration {params['explore']:g}. Device-level: {params['devices']} virtual devices "
        f"(physics drawn per device around the defaults), each round Poisson-samples devices "
        f"at {params['device-rate']:g}, each sampled device fine-tunes "
        f"{params['local-steps']} env steps (lr {params['fed-lr']:g}) and its update is "
        f"clipped to {params['fed-clip']:g}; epsilon with amplification by sampling "
        "(RDP, rate = device-rate) and without (rate 1). Return: mean greedy return over "
        f"{params['eval-episodes']} episodes on the device's physics (device-level: spread "
        f"over the first {params['eval-devices']} devices), mean and min..max over seeds.",
        *lines])
    columns = ["privacy unit", "setting", "noise", "epsilon max", "epsilon no-amplification",
               "return mean", "return median", "return min", "return max", "vs non-private",
               "seeds"]
    return Summary(rows, columns, text, payload={"verdicts": lines, "pretraining": pretrain},
                   plot=lambda path: plot(rows, path, title))


_DEFAULTS: dict[str, Any] = {
    "env-id": "CartPole-v1", "hidden-sizes": "64,64", "seeds": 5, "eval-episodes": 20,
    "goal": 500.0, "pretrain-steps": 60000, "pretrain-lr": 0.0005,
    "pretrain-eval-every": 5000, "pretrain-physics": 4, "delta": 1e-5,
    "device-physics": json.dumps({"length": 0.8, "masscart": 1.5, "force_mag": 8.0}),
    "steps": 2500, "lr": 0.00001, "batch-size": 256, "train-frequency": 100,
    "target-update-interval": 500, "explore": 0.05, "clip": 1.0, "noise": "0.5,1,2,4",
    "devices": 100, "device-rate": 0.1, "rounds": 20, "local-steps": 500, "fed-lr": 0.00001,
    "fed-clip": 0.002, "fed-noise": "0.7,1,2", "eval-devices": 10}
_QUICK = {"seeds": 1, "eval-episodes": 1, "pretrain-physics": 0, "pretrain-steps": 600,
          "pretrain-eval-every": 300,
          "steps": 300, "batch-size": 32, "train-frequency": 4, "noise": "1.0",
          "devices": 4, "device-rate": 0.5, "rounds": 2, "local-steps": 100,
          "fed-noise": "1.0", "eval-devices": 1}

BENCHMARK = register_benchmark(Benchmark(
    "privacy_gain", "public pretraining + private fine-tuning, transition- and device-level DP",
    defaults=_DEFAULTS, quick=_QUICK, cells=cells, summarise=summarise, parallel=False,
    plot_name="epsilon_vs_return.png"))
register_benchmark(Benchmark(
    "privacy_gain_long", "privacy_gain with the fine-tuning of an ordinary DQN run: an update "
    "every 10 env steps, 10,000 steps per device", defaults={
        **_DEFAULTS, "seeds": 3, "steps": 10000, "train-frequency": 10}, quick=_QUICK, cells=cells,
    summarise=summarise, parallel=False, plot_name="epsilon_vs_return.png"))
