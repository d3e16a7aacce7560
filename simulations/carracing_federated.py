"""Four federated CarRacing-v3 devices against the single device, per device's env steps.

Reads a finished (or still running) ``fedq-simulate`` run of
``simulations/scenarios/car_racing_learning.toml`` (the single device's settings on four
devices with their own tracks, FedAvg) from its ``metrics.jsonl``, and the single
device's committed curve (:mod:`simulations.carracing_learning`), and writes both as one
table and plot. Issue 19's target: the federation reaches at least the single device's
return with at most half its env steps per device.

The two are scored on different tracks: each federated round's return is the mean of 3
greedy episodes on each of the 4 devices' own tracks (12 in all, fresh tracks every
round), the single device's of 3 episodes on 3 fixed tracks.

    python -m fedq.simulations.run --scenario simulations/scenarios/car_racing_learning.toml \\
        --run-dir runs/carracing_fed        # add --resume to continue a stopped run
    python -m fedq.simulations.carracing_federated --run-dir runs/carracing_fed
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedq.simulations.federated_cell import curve
from fedq.simulations.results_io import RESULTS_ROOT, markdown_table, results_name, write_results

SINGLE = RESULTS_ROOT / "carracing" / "results.json"


def single_at(points: list[dict[str, Any]], decisions: int) -> float | None:
    """The single device's greedy mean at its last evaluation at or before ``decisions``."""
    before = [p["greedy_mean"] for p in points if p["decisions"] <= decisions]
    return before[-1] if before else None


def plot(fed: list[tuple[int, float]], single: list[dict[str, Any]], random_mean: float,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["decisions"] for p in single], [p["greedy_mean"] for p in single], "o-",
            label="one device")
    ax.plot([s for s, _ in fed], [r for _, r in fed], "s-", label="4 devices, FedAvg")
    ax.axhline(random_mean, color="red", linestyle="--", label=f"random {random_mean:.0f}")
    ax.set_xlabel("decisions per device (x4 env frames)")
    ax.set_ylabel("greedy return")
    ax.set_title("CarRacing-v3 discrete, edge-cnn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/carracing_fed"))
    parser.add_argument("--results-name", type=results_name, default="carracing_federated")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.exists():
        parser.error(f"{metrics} does not exist: no round of the run has finished")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    single = json.loads(SINGLE.read_text())
    points, random_mean = single["points"], single["summary"]["random_mean"]
    steps, returns = curve(rows)
    fed = [(int(s), r) for s, r in zip(steps, returns, strict=True) if r == r]
    table = [{"round": row["round"], "decisions per device": int(s),
              "federated return (12 episodes)": round(r, 1) if r == r else None,
              "one device at the same decisions": single_at(points, int(s))}
             for row, s, r in zip(rows, steps, returns, strict=True)]
    best_single = max(p["greedy_mean"] for p in points)
    best_single_at = next(p["decisions"] for p in points if p["greedy_mean"] == best_single)
    half = best_single_at // 2
    within_half = [r for s, r in fed if s <= half]
    met = bool(within_half) and max(within_half) >= best_single
    summary = {"rounds": len(rows), "decisions_per_device": int(steps[-1]) if steps else 0,
               "federated_best": max((r for _, r in fed), default=None),
               "federated_final": fed[-1][1] if fed else None,
               "single_best": best_single, "single_best_at": best_single_at,
               "federated_best_within_half": max(within_half, default=None),
               "target_met": met, "random_mean": random_mean}
    planned = json.loads((args.run_dir / "config.json").read_text())["num-server-rounds"]
    text = (f"{len(rows)} of {planned} rounds finished, "
            f"{summary['decisions_per_device']} decisions per device.\n\n"
            + markdown_table(table, list(table[0]) if table else ["round"])
            + f"\n\nOne device: best {best_single:.1f} at {best_single_at} decisions; the "
            f"target asks the federation for >= {best_single:.1f} within {half} decisions "
            f"per device: best there {max(within_half, default=float('nan')):.1f}, "
            f"**{'met' if met else 'not met'}**. Random policy {random_mean:.1f}. "
            "Federated returns: 3 greedy episodes on each device's own tracks, fresh every "
            "round; one device: 3 episodes on 3 fixed tracks.")
    folder = write_results(args.results_name, {"summary": summary, "rounds": rows,
                                               "single_points": points}, text)
    plot(fed, points, random_mean, folder / "curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
