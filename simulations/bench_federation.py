"""Does federation pay? Per-client env steps until the global model solves CartPole, N = 1..8.

Each cell is a real run in Flower's simulation engine (``simulations.run.simulate``):
N homogeneous CartPole-v1 devices (different seeds), FedAvg every ``--local-steps`` env
steps, federated greedy evaluation after every round over ``--eval-episodes-total``
episodes split evenly across the devices (every N is judged on as many episodes: with 5
per device, one device would pass on 5 lucky episodes where 8 devices need 40). Every
cell runs all ``--max-rounds`` rounds and counts as solved at the third round in a row
whose mean greedy return reaches 475 (:func:`simulations.results_io.solved_at`); its
result is the env steps *per client* at that round, and it also reports its final and its
best return, so a model that reaches the goal and loses it shows as such. Runs that never
do count as unsolved. ``--stop-at-first-goal`` restores the old, cheaper cells that stop
(``target-return``) at the first round at the goal; they report that round, and their
"solved" is the first evaluation at the goal, not three in a row.

The same runs give the round overhead: the share of a round's wall time not spent in
local training (sending weights, Ray scheduling, loading/saving device state,
aggregation, and, for the full round, federated evaluation). Local training's wall time
is the slowest client's ``train-seconds`` when every client has its own core, else the
clients' summed ``train-seconds`` spread over the cores. Round 1 (Ray actors importing
torch) is left out.

    python -m fedq.simulations.bench_federation --clients 1,2,4,8 --seeds 3
    python -m fedq.simulations.bench_federation --clients 1,4 --local-steps 500 \
        --set strategy=fedavgm --set server-momentum=0.5

``--set KEY=VALUE`` changes a config key for every N alike (the variant's cells and its
results folder are named after the overrides and a non-default ``--local-steps``, so
variants never mix). Each finished cell is kept in ``runs/bench_federation/`` (the run
directory itself), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigScalar, parse_assignment
from fedq.simulations.federated_cells import curve
from fedq.simulations.results_io import curve_summary, markdown_table, spread, write_results
from fedq.simulations.run import resolve_run_config, simulate

GOAL = 475.0
DEFAULT_LOCAL_STEPS = 2500
CACHE = Path("runs/bench_federation")


def variant_name(overrides: dict[str, ConfigScalar]) -> str:
    """A file-name-safe tag of the ``--set`` overrides ('' for the defaults)."""
    return "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))


def cell_dir(clients: int, seed: int, local_steps: int, eval_episodes: int,
             overrides: dict[str, ConfigScalar], max_rounds: int | None = None) -> Path:
    """A cell's run directory; ``max_rounds`` names cells that run every round (None:
    the old cells that stop at the first round at the goal keep their old names)."""
    full = f"-full{max_rounds}" if max_rounds is not None else ""
    return (CACHE / f"n{clients}-seed{seed}-local{local_steps}-eval{eval_episodes}"
                     f"{variant_name(overrides)}{full}").resolve()


def run_cell(clients: int, seed: int, local_steps: int, max_rounds: int,
             eval_episodes: int, overrides: dict[str, ConfigScalar],
             stop_at_first_goal: bool = False) -> list[dict[str, Any]]:
    """The metrics rows of one federated run (reused when the run already finished)."""
    run_dir = cell_dir(clients, seed, local_steps, eval_episodes, overrides,
                       None if stop_at_first_goal else max_rounds)
    done = run_dir / "DONE"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # benchmark processes may share the cache
        if not done.exists():
            _run_fresh(run_dir, clients, seed, local_steps, max_rounds, eval_episodes,
                       overrides, stop_at_first_goal)
            done.write_text("ok\n")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_fresh(run_dir: Path, clients: int, seed: int, local_steps: int, max_rounds: int,
               eval_episodes: int, variant: dict[str, ConfigScalar],
               stop_at_first_goal: bool) -> None:
    """Run one cell from scratch (an interrupted cell's leftovers are removed first)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {**variant, "seed": seed, "local-steps": local_steps,
                 "num-server-rounds": max_rounds, "eval-episodes": eval_episodes,
                 "min-available-clients": clients, "run-dir": str(run_dir),
                 **({"target-return": GOAL} if stop_at_first_goal else {})}
    _, run_config = resolve_run_config(overrides, clients)
    result = simulate(run_config, clients, stream=False, timeout=4 * 3600)
    if not result.ok:
        raise RuntimeError(f"N={clients} seed={seed}: run ended {result.status}: "
                           f"{result.status_details}; see {run_dir / 'flower.log'}")


def overhead_shares(rows: list[dict[str, Any]], clients: int, cores: int,
                    sequential: bool = False) -> tuple[float, float]:
    """Median share of (train phase, whole round) outside local training, rounds >= 2.
    With the ``sequential`` strategy the devices train one after another, so local
    training's wall time is the sum of their train-seconds."""
    train_phase, whole = [], []
    for row in rows[1:]:
        t = row["train"]
        training = t["train-seconds-sum"] if sequential else max(
            t["train-seconds-max"], t["train-seconds-sum"] / min(clients, cores))
        train_phase.append(1 - training / row["train-phase-seconds"])
        whole.append(1 - training / row["round-seconds"])
    if not train_phase:
        return float("nan"), float("nan")
    return statistics.median(train_phase), statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--local-steps", type=int, default=DEFAULT_LOCAL_STEPS)
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--eval-episodes-total", type=int, default=24,
                        help="greedy episodes per evaluation over all clients (each of N "
                             "clients runs total // N), so every N is judged on as many "
                             "episodes")
    parser.add_argument("--stop-at-first-goal", action="store_true",
                        help="stop each cell at its first round at the goal (the old cells: "
                             "cheaper, but cannot tell whether the goal is kept)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="a config override for every cell")
    args = parser.parse_args()
    overrides = dict(parse_assignment(item) for item in args.overrides)
    resolve_run_config(overrides, 1)  # a bad override fails here, naming the field
    cores = len(os.sched_getaffinity(0))
    cells, table = [], []
    for n in [int(x) for x in args.clients.split(",")]:
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows = run_cell(n, seed, args.local_steps, args.max_rounds,
                            max(1, args.eval_episodes_total // n), overrides,
                            args.stop_at_first_goal)
            points = [(s, r) for s, r in zip(*curve(rows), strict=True) if r == r]
            summary = curve_summary(points, GOAL)
            if args.stop_at_first_goal:  # the old rule: the first evaluation at the goal
                summary["solved-at"] = next((s for s, r in points if r >= GOAL), None)
            steps = summary["solved-at"]
            solved = steps is not None
            solved_round = next((r["round"] for r in rows
                                 if r["env-steps-per-client-total"] == steps), len(rows))
            train_share, round_share = overhead_shares(
                rows, n, cores, sequential=overrides.get("strategy") == "sequential")
            cell = {"clients": n, "seed": seed, "solved": solved, "rounds": len(rows),
                    "steps-per-client": steps, "final-return": summary["final-return"],
                    "best-return": summary["best-return"],
                    "overhead-share-train-phase": train_share,
                    "overhead-share-round": round_share,
                    "seconds-to-goal": sum(r["round-seconds"] for r in rows[:solved_round])
                    if solved else None,
                    "median-round-seconds": statistics.median(
                        r["round-seconds"] for r in rows[1:]) if len(rows) > 1 else None,
                    # (env steps per client, federated return); null: no evaluation
                    "curve": [[s, r if r == r else None]
                              for s, r in zip(*curve(rows), strict=True)]}
            print(json.dumps({k: v for k, v in cell.items() if k != "curve"}), flush=True)
            per_seed.append(cell)
        cells += per_seed
        solved_steps = [c["steps-per-client"] for c in per_seed if c["solved"]]
        table.append({
            "clients": n, "solved": f"{len(solved_steps)}/{len(per_seed)}",
            "median steps/client to 475": statistics.median(solved_steps) if solved_steps
            else None,
            "total env steps (median)": n * statistics.median(solved_steps) if solved_steps
            else None,
            "final return": spread([c["final-return"] for c in per_seed
                                    if c["final-return"] is not None]),
            "best return": spread([c["best-return"] for c in per_seed
                                   if c["best-return"] is not None]),
            "overhead share, train phase": statistics.median(
                c["overhead-share-train-phase"] for c in per_seed),
            "overhead share, whole round": statistics.median(
                c["overhead-share-round"] for c in per_seed),
            "median round s": statistics.median(
                c["median-round-seconds"] for c in per_seed if c["median-round-seconds"]),
            "median wall s to 475": statistics.median(
                c["seconds-to-goal"] for c in per_seed if c["solved"]) if solved_steps
            else None,
        })
    base = table[0]["median steps/client to 475"]
    for row in table:
        steps = row["median steps/client to 475"]
        row["vs N=1"] = steps / base if steps and base else None
    columns = ["clients", "solved", "median steps/client to 475", "vs N=1",
               "total env steps (median)", "final return", "best return",
               "overhead share, train phase",
               "overhead share, whole round", "median round s", "median wall s to 475"]
    markdown = markdown_table(table, columns)
    print(markdown)
    folder = "federation" + variant_name(overrides) + (
        f"-local{args.local_steps}" if args.local_steps != DEFAULT_LOCAL_STEPS else "") + (
        "-first-goal" if args.stop_at_first_goal else "")
    written = write_results(folder, {"summary": table, "cells": cells, "cores": cores,
                           "local-steps": args.local_steps, "goal": GOAL,
                           "max-rounds": args.max_rounds,
                           "eval-episodes-total": args.eval_episodes_total,
                           "stop-at-first-goal": args.stop_at_first_goal,
                           "overrides": overrides},
                  f"{markdown}\n\nSteps per client are counted at the "
                  f"{'first round' if args.stop_at_first_goal else 'third round in a row'} "
                  f"whose federated greedy return (mean over {args.eval_episodes_total} "
                  f"episodes split evenly over the clients) reaches {GOAL:g}"
                  f"{' (cells stopped there)' if args.stop_at_first_goal else ''}; final = "
                  f"the last round's return, best = the best round's, median [min, max] "
                  f"over seeds; {args.max_rounds} rounds at most; aggregation every "
                  f"{args.local_steps} local env steps"
                  f"{'; overrides ' + str(overrides) if overrides else ''}; "
                  f"{cores} cores. Overhead shares are medians over rounds >= 2. Learning "
                  "curves: curves.png.\n")
    plot_curves(cells, written / "curves.png",
                f"CartPole-v1, {overrides.get('strategy', 'fedavg')}, {args.local_steps} "
                "local steps per round")


def plot_curves(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    """Every cell's federated greedy return against env steps per client, one colour
    per N, with the goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {n: f"C{i}" for i, n in enumerate(sorted({c["clients"] for c in cells}))}
    for cell in cells:
        steps, returns = zip(*cell["curve"], strict=True) if cell["curve"] else ((), ())
        ax.plot(steps, returns, color=colours[cell["clients"]], alpha=0.7, marker=".",
                label=f"N={cell['clients']}" if cell["seed"] == min(
                    c["seed"] for c in cells if c["clients"] == cell["clients"]) else None)
    ax.axhline(GOAL, color="grey", linestyle=":", label=f"goal {GOAL:g}")
    ax.set_xlabel("env steps per client")
    ax.set_ylabel("federated greedy return (each seed a line)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
