"""Privacy-utility sweep: device-side DP-SGD noise multipliers x clipping norms x seeds.

Every cell is a real federated run in Flower's simulation engine
(:func:`simulations.federated_cells.run_cell`, i.e. ``fedq-simulate``) with the same
scenario and the same env-step budget per device (``--rounds`` x ``--local-steps``), plus
the non-private baseline with that budget. For each cell the sweep reads

- every device's final lifetime epsilon (at ``--delta``), recomputed here with Opacus's
  accountant from the ledger the device left on its disk (``privacy.json``), not from
  what the server was told;
- the final federated greedy return: the last round's mean over the devices' greedy
  evaluation episodes of the global model (and, less noisy, the mean of the last three
  rounds).

Seeds are summarised as mean and spread (min..max); the table goes through
``results_io.write_results("privacy_sweep", ...)`` and the plot (return vs epsilon, log
x) to ``simulations/results/privacy_sweep/privacy_utility.png``.

Resumable: each finished cell is marked ``DONE`` in its run directory under
``runs/privacy_sweep/<budget>/`` and reused; a cell interrupted half-way is started again
from scratch (a resumed cell would repeat a round and spend extra epsilon and env steps).
So re-running the same command after an interruption continues the sweep, and widening
the grid (more noise values, clip norms or seeds) runs only the new cells.

    python -m fedq.simulations.privacy_sweep --noise 0.8,1.2,2.0 --clip 1.0 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigScalar, parse_assignment
from fedq.common.privacy import epsilon_of
from fedq.simulations.federated_cells import Cell, run_cell
from fedq.simulations.results_io import RESULTS_ROOT, markdown_table, results_name, write_results
from fedq.simulations.run import resolve_run_config

CACHE = Path("runs/privacy_sweep")
UTILITY_SHARE = 0.9  # the target: >= 90 % of the non-private return


@dataclass(frozen=True)
class Setting:
    """One row of the table: a (noise multiplier, clip norm), or the baseline (None)."""

    noise: float | None
    clip: float | None

    @property
    def name(self) -> str:
        return "no-dp" if self.noise is None else f"noise{self.noise:g}-clip{self.clip:g}"


def budget_name(args: argparse.Namespace) -> str:
    """The cache folder of one scenario and budget: cells in it are comparable."""
    return (f"{args.env_id}-n{args.clients}-r{args.rounds}x{args.local_steps}"
            f"-ls{args.learning_starts}-b{args.batch_size}"
            + "".join(f"-{k}{v}" for k, v in sorted(args.overrides.items())))


def overrides_of(setting: Setting, seed: int, args: argparse.Namespace) -> dict[str, ConfigScalar]:
    base: dict[str, ConfigScalar] = {
        "env-id": args.env_id, "seed": seed, "num-server-rounds": args.rounds,
        "local-steps": args.local_steps, "learning-starts": args.learning_starts,
        "batch-size": args.batch_size, "eval-episodes": args.eval_episodes,
        **args.overrides}
    if setting.noise is None:
        return base
    return {**base, "dp-enabled": True, "dp-noise-multiplier": setting.noise,
            "dp-clip-norm": float(setting.clip), "dp-delta": args.delta}


def device_epsilons(run_dir: Path, delta: float) -> list[float]:
    """Each device's lifetime epsilon from the ledger on its disk (Opacus RDP)."""
    epsilons = []
    for device in sorted((run_dir / "devices").iterdir()):
        generation = (device / "CURRENT").read_text().strip()
        ledger = json.loads((device / generation / "privacy.json").read_text())
        history = tuple((float(n), float(q), int(k)) for n, q, k in ledger["history"])
        epsilons.append(epsilon_of("rdp", delta, history))
    return epsilons


def summarise(setting: Setting, cells: list[Cell], cache: Path, delta: float,
              clients: int) -> dict[str, Any]:
    """One table row: epsilon over devices and seeds, return mean and spread over seeds."""
    finals = [c.rows[-1]["eval"]["eval-return-mean"] for c in cells]
    last3 = [statistics.fmean(r["eval"]["eval-return-mean"] for r in c.rows[-3:])
             for c in cells]
    row: dict[str, Any] = {
        "setting": setting.name,
        "noise": "-" if setting.noise is None else setting.noise,
        "clip": "-" if setting.clip is None else setting.clip,
        "seeds": len(cells),
        "return mean": statistics.fmean(finals),
        "return min": min(finals),
        "return max": max(finals),
        "return std": statistics.pstdev(finals),
        "last-3-rounds return mean": statistics.fmean(last3),
        "env steps per device": cells[0].rows[-1]["env-steps-per-client-total"],
        "env steps total": cells[0].rows[-1]["env-steps-per-client-total"] * clients,
        "per-seed returns": finals,
    }
    if setting.noise is not None:
        epsilons = [e for c in cells for e in device_epsilons(cache / c.name, delta)]
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


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """inf (no DP) as null: strict JSON has no Infinity."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", default="0.8,1.2,2.0", help="noise multipliers")
    parser.add_argument("--clip", default="1.0", help="per-transition clip norms")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=2500)
    parser.add_argument("--learning-starts", type=int, default=2500,
                        help="env steps before the first update: later starts mean smaller "
                             "sample rates (batch / buffer length), so less epsilon per update")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--results-name", default="privacy_sweep", type=results_name,
                        help="folder under simulations/results/ for the table and plot "
                             "(another name keeps a second scenario's sweep beside the first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a learner setting for every cell, DP or not (e.g. "
                             "train-frequency=8): the baseline differs only in DP")
    args = parser.parse_args()
    args.overrides = dict(parse_assignment(item) for item in args.overrides)
    resolve_run_config(args.overrides, args.clients)  # a bad override fails here, naming it

    cache = CACHE / budget_name(args)
    settings = [Setting(None, None)] + [Setting(n, c) for c in _floats(args.clip)
                                        for n in _floats(args.noise)]
    rows = []
    for setting in settings:
        cells = []
        for seed in range(args.seeds):
            name = f"{setting.name}-seed{seed}"
            print(f"[sweep] {name}", flush=True)
            cell = run_cell(cache, name, overrides_of(setting, seed, args), args.clients)
            if not cell.ok or not cell.rows:
                raise RuntimeError(f"cell {name} failed: {cell.status}; see "
                                   f"{cache / name / 'flower.log'}")
            cells.append(cell)
        rows.append(summarise(setting, cells, cache, args.delta, args.clients))
        print(f"[sweep] {setting.name}: return {rows[-1]['return mean']:.1f} "
              f"eps max {rows[-1]['epsilon max']:.3g}", flush=True)

    baseline, private = rows[0], rows[1:]
    for row in private:
        row["vs non-private"] = row["return mean"] / baseline["return mean"]
    baseline["vs non-private"] = 1.0
    eligible = [r for r in private if r["epsilon max"] <= 8.0]
    best = max(eligible, key=lambda r: r["return mean"], default=None)
    budget = args.rounds * args.local_steps
    title = (f"{args.env_id}, {args.clients} devices, {args.seeds} seeds, {budget:,} env "
             f"steps per device, delta {args.delta:g}")
    out_dir = RESULTS_ROOT / args.results_name
    plot(private, baseline, out_dir / "privacy_utility.png", title)
    columns = ["setting", "noise", "clip", "epsilon max", "epsilon mean", "return mean",
               "return min", "return max", "return std", "last-3-rounds return mean",
               "vs non-private", "env steps per device", "env steps total", "seeds"]
    met = best is not None and best["vs non-private"] >= UTILITY_SHARE
    verdict = "no setting reached epsilon <= 8" if best is None else (
        f"best setting with epsilon <= 8 per device: {best['setting']} (epsilon max "
        f"{best['epsilon max']:.2f}), return {best['return mean']:.1f} = "
        f"{best['vs non-private']:.0%} of the non-private {baseline['return mean']:.1f} "
        f"(target >= {UTILITY_SHARE:.0%}: {'met' if met else 'not met'})")
    markdown = "\n\n".join([
        f"Privacy-utility sweep: {title}; FedAvg every {args.local_steps} env steps, "
        f"learning-starts {args.learning_starts}, batch {args.batch_size}"
        f"{', ' + str(args.overrides) if args.overrides else ''}. Return: the last "
        f"round's federated greedy return (mean over devices x {args.eval_episodes} "
        "episodes), mean and min..max over seeds. Epsilon: each device's lifetime "
        "epsilon (Opacus RDP) recomputed from its on-disk ledger; max and mean over "
        "devices and seeds. Privacy unit: one transition of a device's replay buffer.",
        markdown_table([baseline, *private], columns),
        verdict, "Plot: `privacy_utility.png`."])
    write_results(args.results_name, {
        "settings": vars(args), "rows": [_json_safe(r) for r in (baseline, *private)],
        "verdict": verdict}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
