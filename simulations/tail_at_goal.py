"""How often a CartPole run's model is at the goal late in its budget, not only at its end.

Issue 20's target asks for a final greedy return >= 475 at 150k env steps per device. On
five seeds that is five coin flips: a model that is at the goal in half of its late
evaluations ends there on 0-5 seeds by chance (FedAvg on seeds 0-4 ended there on 4/5 with
batches of 128 and on 2/5 with 64, at the same late share; over 15 seeds, 13/15 and 10/15).
This reads the committed results of the 150k CartPole benchmarks, lone device and federated
N=2, 4 and 8, and reports per setting:

- **final >= goal**: the benchmark's last evaluation (federated: 24 episodes; lone
  device: 10), and, where ``final_model_replay`` scored the final model on 100 fresh
  episodes, that count too;
- **last third at goal**: the share of a run's evaluations after two thirds of its budget
  (after 100k env steps per device: rounds 41-60 of 60) at or above the goal, per seed,
  and its mean over seeds. Twenty evaluations per seed say more about whether a setting
  keeps what it learned than the one final evaluation does;
- **last 10k at goal**: the same over the last 10,000 env steps per device (the last 4
  rounds of 2,500), where the default learning rate is below 7 % of its start: where the
  model settles as the rate reaches 0.

A frozen model near the goal still misses it in some evaluations (evaluation noise), so
100 % needs a model that is at 500 on nearly every episode.

It runs nothing: it reads ``simulations/results/<source>/results.json`` (and
``final_model_replay.json``) and writes ``tail_at_goal.json`` / ``.md`` beside
``federation_n4``'s results (the issue's target benchmark; like ``final_model_replay``,
an analysis beside a benchmark, not a benchmark of its own). A test
checks that the committed output is what the committed sources give, so a regenerated
source fails it until this is rerun.

    python -m fedq.simulations.tail_at_goal
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedq.common.atomic import atomic_write_text
from fedq.simulations.results_io import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
OUT = "federation_n4"  # the folder the analysis is written to: tail_at_goal.json / .md
GOAL = 475.0
ENV = "CartPole-v1"
COMMAND = "python -m fedq.simulations.tail_at_goal"

# Every committed 150k-per-device CartPole result, lone device first.
SOURCES = (
    "learning", "stability_sweep_cartpole5", "stability_sweep_decay_two_thirds",
    "stability_sweep_batch128",
    "federation_n4", "federation_n4_sequential_seeds5_9", "federation_n4_fedavg_seeds5_9",
    "federation_n4_fedavg_seeds10_14", "federation_n4_fedavg_batch128",
    "federation_n4_fedavg_batch128_seeds5_9", "federation_n4_fedavg_batch128_seeds10_14",
    "federation_n4_decay100k", "federation_n4_decay100k_sequential_seeds5_9",
    "federation_n4_decay100k_sequential_seeds10_14",
    "federation_n4_every500", "federation_n4_every250",
    "federation_n2_n8_sequential", "federation_n2_n8_decay100k_sequential",
)
# (source, group) whose runs are another row's again, left out so no seed counts twice: the
# later sweeps' "defaults" are stability_sweep_cartpole5's td-clip+lr-decay (the same
# settings, spelt out there; the curves are identical).
REPEATS = {("stability_sweep_decay_two_thirds", "defaults"),
           ("stability_sweep_batch128", "defaults")}
LAST_STEPS = 10_000

# The same setting over two seed ranges, pooled: (label, ((source, group), ...)).
POOLS = (
    ("FedAvg N=4, batch 64 (default)",
     (("federation_n4", "fedavg N=4"), ("federation_n4_fedavg_seeds5_9", "fedavg N=4"),
      ("federation_n4_fedavg_seeds10_14", "fedavg N=4"))),
    ("FedAvg N=4, batch 128",
     (("federation_n4_fedavg_batch128", "fedavg N=4"),
      ("federation_n4_fedavg_batch128_seeds5_9", "fedavg N=4"),
      ("federation_n4_fedavg_batch128_seeds10_14", "fedavg N=4"))),
    ("sequential N=4, rate to 0 over 150k (default)",
     (("federation_n4", "sequential N=4"),
      ("federation_n4_sequential_seeds5_9", "sequential N=4"))),
    ("sequential N=4, rate to 0 over 100k",
     (("federation_n4_decay100k", "sequential N=4"),
      ("federation_n4_decay100k_sequential_seeds5_9", "sequential N=4"),
      ("federation_n4_decay100k_sequential_seeds10_14", "sequential N=4"))),
)


def tail_share(curve: Sequence[Sequence[float | None]], after: float,
               goal: float = GOAL) -> float | None:
    """Share of ``curve``'s evaluations (``[steps, return]``, return None where nothing was
    evaluated) after ``after`` steps at or above ``goal``; None where there are none."""
    tail = [v for steps, v in curve if steps is not None and steps > after and v is not None]
    return sum(v >= goal for v in tail) / len(tail) if tail else None


def group_of(run: dict[str, Any]) -> str | None:
    """A federated run's strategy and size, or a lone CartPole run's variant (None: another
    env)."""
    if "strategy" in run:
        return f"{run['strategy']} N={run['clients']}"
    if run["env"] != ENV:
        return None
    return str(run.get("variant", "defaults"))


def _replays(folder: Path, runs: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(group, seed) -> the final model's return on fresh episodes, where scored. Replays
    written before they recorded the number of devices belong to ``runs`` of one size."""
    path = folder / "final_model_replay.json"
    if not path.is_file():
        return {}
    (size, *others) = {r.get("clients") for r in runs}
    return {(group_of({**r, "clients": r.get("clients") or size}), r["seed"]):
            r["final model return"]
            for r in json.loads(path.read_text())["runs"] if r["final model return"] is not None
            and (r.get("clients") is not None or not others)}


def seed_rows(results: Path = RESULTS) -> list[dict[str, Any]]:
    """One row per seed of every source: its group, final return, replay and tail share."""
    rows = []
    for source in SOURCES:
        folder = results / source
        runs = json.loads((folder / "results.json").read_text())["runs"]
        replays = _replays(folder, runs)
        for run in runs:
            group = group_of(run)
            if group is None or (source, group) in REPEATS:
                continue
            budget = run["curve"][-1][0]
            rows.append({"source": source, "group": group, "seed": run["seed"],
                         "final": run["final-return"],
                         "replay": replays.get((group, run["seed"])),
                         "last third": tail_share(run["curve"], budget * 2 / 3),
                         "last 10k": tail_share(run["curve"], budget - LAST_STEPS)})
    return rows


def summary_row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The table row of one setting's seeds."""
    replays = [r["replay"] for r in runs if r["replay"] is not None]
    finals = [r["final"] for r in runs if r["final"] is not None]
    return {
        "setting": label, "seeds": ", ".join(str(r["seed"]) for r in runs),
        "final >= goal": f"{sum(v >= GOAL for v in finals)}/{len(finals)}",
        "final model, 100 fresh episodes >= goal":
            f"{sum(v >= GOAL for v in replays)}/{len(replays)}" if replays else None,
        **{f"{tail} at goal, %": _percentages([r[tail] for r in runs])
           for tail in ("last third", "last 10k")}}


def _percentages(shares: list[float | None]) -> str:
    """``mean (per seed, ...)`` in percent; '-' for a seed without evaluations there."""
    present = [s for s in shares if s is not None]
    if not present:
        return "-"
    per_seed = ", ".join("-" if s is None else f"{100 * s:.0f}" for s in shares)
    return f"{100 * statistics.mean(present):.0f} ({per_seed})"


def summarise(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(a row per source and group, a row per pool of :data:`POOLS`)."""
    table = []
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        for group in dict.fromkeys(r["group"] for r in mine):
            table.append(summary_row(f"{source}: {group}",
                                     [r for r in mine if r["group"] == group]))
    pooled = [summary_row(label, [r for r in rows if (r["source"], r["group"]) in parts])
              for label, parts in POOLS]
    return table, pooled


COLUMNS = ["setting", "seeds", "final >= goal", "final model, 100 fresh episodes >= goal",
           "last third at goal, %", "last 10k at goal, %"]


def report(results: Path = RESULTS) -> tuple[dict[str, Any], str]:
    """The JSON payload and the markdown of the committed sources under ``results``."""
    rows = seed_rows(results)
    table, pooled = summarise(rows)
    payload = {"command": COMMAND, "goal": GOAL, "sources": list(SOURCES), "summary": table,
               "pooled": pooled, "runs": rows}
    text = ("# CartPole-v1 at 150k env steps per device: final, last third and last 10k at "
            f"the goal\n\nCommand: `{COMMAND}` (reads the committed results of its sources; runs "
            f"nothing)\n\n{markdown_table(table, COLUMNS)}\n\nPooled over seed ranges:\n\n"
            f"{markdown_table(pooled, COLUMNS)}\n\nFinal: each source's last evaluation "
            "(federated: 24 episodes split over the devices; lone device: 10 episodes). "
            "Last third / last 10k: the share of a run's evaluations after 100k / 140k env "
            "steps per device at >= 475 (federated: one per round; lone device: one every "
            "2,500 steps), mean over seeds (per seed). The final model's replay: "
            "final_model_replay.json beside the source. Per-seed values in tail_at_goal.json.\n")
    return payload, text


def main() -> None:
    payload, text = report()
    out = RESULTS / OUT
    atomic_write_text(out / "tail_at_goal.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(out / "tail_at_goal.md", text)
    print(text)


if __name__ == "__main__":
    main()
