"""Which aggregation settings could make N devices need fewer env steps each? A fast probe.

Each cell is one (lever, N, seed) run of the in-process round loop of
:mod:`simulations.levers_cell` (the devices' own ``LocalTrainer``, FedAvg or a variant,
no Flower): per-device env steps until the global model's greedy return is at 475 on three
evaluations in a row, beside its final and best return. A lever's N = 1 row is its own
baseline (its settings change every device alike).

    python -m fedq.simulations.bench federation_levers --workers 2
    python -m fedq.simulations.bench federation_levers --set levers=lr1e-3-fedavg-250 \
        --set seeds=10 --set clients=4 --set max-steps=12000 --set keep-training=true

``levers``: comma-separated names from :data:`simulations.levers_cell.LEVERS`, or ``all``.
``keep-training``: train every cell to ``max-steps`` even once solved (the result is still
when it was solved; the final return and the curve show whether it stays solved).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    HarnessError,
    Summary,
    name_list,
    register_benchmark,
)
from fedq.simulations.levers_cell import (
    EVAL_EPISODES,
    EVAL_EVERY,
    GOAL,
    LEVERS,
    LEVERS_RUN,
)
from fedq.simulations.results_io import spread


def _levers(params: Mapping[str, Any]) -> list[str]:
    return name_list(params, "levers", list(LEVERS), everything="all")


def clients_param(params: Mapping[str, Any]) -> list[int]:
    """The ``clients`` parameter (comma-separated N >= 1); bench_federation_pays reads it too."""
    try:
        clients = [int(n) for n in str(params["clients"]).split(",")]
    except ValueError:
        raise HarnessError(f"clients: expected comma-separated integers, got "
                           f"{params['clients']!r}") from None
    if min(clients) < 1:
        raise HarnessError(f"clients: every N must be >= 1, got {params['clients']!r}")
    return clients


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """One cell per (lever, N, seed), lever-major; bad parameters fail here, naming them."""
    if params["max-steps"] < EVAL_EVERY:
        raise HarnessError(f"max-steps: must be >= {EVAL_EVERY} (one evaluation), got "
                           f"{params['max-steps']}")
    if params["seeds"] < 1 or params["first-seed"] < 0:
        raise HarnessError("seeds must be >= 1 and first-seed >= 0")
    seeds = range(params["first-seed"], params["first-seed"] + params["seeds"])
    return [Cell(LEVERS_RUN, {"lever": lever, "clients": n, "seed": seed,
                              "max-steps": params["max-steps"],
                              "stop-at-goal": not params["keep-training"]})
            for lever in _levers(params) for n in clients_param(params) for seed in seeds]


def table(cells: list[dict[str, Any]], max_steps: int) -> list[dict[str, Any]]:
    """One row per lever and N: per-seed results, median (unsolved counted as the cap)
    and the ratio to N = 1 under the same lever."""
    rows = []
    for name in LEVERS:
        medians: dict[int, float] = {}
        for n in sorted({c["clients"] for c in cells if c["lever"] == name}):
            mine = sorted((c for c in cells if c["lever"] == name and c["clients"] == n),
                          key=lambda c: c["seed"])
            steps = [c["solved_at"] if c["solved_at"] is not None else max_steps for c in mine]
            medians[n] = statistics.median(steps)
            rows.append({
                "lever": name, "N": n,
                "per seed": ", ".join(f"{c['solved_at']:,}" if c["solved_at"] is not None
                                      else f">{max_steps:,}" for c in mine),
                "solved": f"{sum(c['solved_at'] is not None for c in mine)}/{len(mine)}",
                "median": medians[n],
                "final": spread([c["final_return"] for c in mine
                                 if c.get("final_return") is not None]),
                "best": spread([c["best_return"] for c in mine
                                if c.get("best_return") is not None]),
                # None (JSON null, "-" in the table) when the run had no N = 1 baseline
                "vs N=1": medians[n] / medians[1] if 1 in medians else None})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Median per-device env steps to solved per lever, one bar per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levers = list(dict.fromkeys(r["lever"] for r in rows))
    sizes = sorted({r["N"] for r in rows})
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(levers) + 1.5))
    for k, n in enumerate(sizes):
        mine = {r["lever"]: r["median"] for r in rows if r["N"] == n}
        ys = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(levers))]
        ax.barh(ys, [mine.get(lever, 0) for lever in levers], width, label=f"N={n}")
    ax.set_yticks(range(len(levers)), levers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median env steps per device to solved (unsolved: the cap)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    runs = [result for _, result in done]
    rows = table(runs, params["max-steps"])
    legend = "\n".join(f"- `{name}`: {LEVERS[name].meaning}" for name in _levers(params))
    text = (f"Per-device env steps until the global model's mean greedy return over "
            f"{EVAL_EPISODES} episodes reaches {GOAL:g} on three evaluations in a row "
            f"(evaluated every {EVAL_EVERY} steps); unsolved cells count as the cap "
            f"({params['max-steps']:,}) in the median. Final and best: the last and the "
            "best evaluation of the cell, median [min, max] over seeds (the final return is "
            "the solved one unless keep-training).\n\n" + legend)
    return Summary(rows, ["lever", "N", "per seed", "solved", "median", "vs N=1", "final",
                          "best"], text, payload={"goal": GOAL, "eval-every": EVAL_EVERY,
                                                  "eval-episodes": EVAL_EPISODES,
                                                  "runs": runs},
                   plot=lambda path: plot(rows, path))


BENCHMARK = register_benchmark(Benchmark(
    "federation_levers", "in-process probe of aggregation levers: per-device env steps to "
    "solved (3 in a row), N=1 vs N=4",
    defaults={"levers": "all", "clients": "1,4", "seeds": 3, "first-seed": 0,
              "max-steps": 50_000, "keep-training": False},
    quick={"levers": "fedavg-500", "clients": "1", "seeds": 1, "max-steps": 500},
    cells=cells, summarise=summarise, plot_name="levers.png"))
