"""Does federation pay? Per-client env steps until the global model solves CartPole, N = 1..8.

Each cell is a real run in Flower's simulation engine (a ``federated-run`` cell of
:mod:`simulations.federated_cell`): N homogeneous CartPole-v1 devices (different seeds),
one round every ``local-steps`` env steps per device, federated greedy evaluation after
every round over ``eval-episodes-total`` episodes split evenly across the devices (every N
is judged on as many episodes: with 5 per device, one device would pass on 5 lucky
episodes where 8 devices need 40). Every cell runs all ``max-rounds`` rounds and counts as
solved at the third round in a row whose mean greedy return reaches 475
(:func:`simulations.results_io.solved_at`); its result is the env steps *per client* at
that round, beside its final and its best return, so a model that reaches the goal and
loses it shows as such. Runs that never do count as unsolved.

``strategies``: each runs the same grid; ``sequential`` (each device trains the previous
device's result) runs on the federation's exploration clock, as docs/benchmarks.md
explains, ``fedavg`` is the weights-averaging contrast. ``learner``: comma-separated
``KEY=VALUE`` config settings for every cell (e.g. ``learning-rate=0.002``).

The same runs give the round overhead: the share of a round's wall time not spent in
local training (sending weights, Ray scheduling, loading/saving device state,
aggregation, and, for the whole round, federated evaluation). Local training's wall time
is the slowest client's ``train-seconds`` when every client has its own core, else the
clients' summed ``train-seconds`` spread over the cores (sequential: their sum). Round 1
(Ray actors importing torch) is left out.

    python -m fedq.simulations.bench federation
    python -m fedq.simulations.bench federation --set strategies=sequential \
        --set learner=learning-rate=0.002
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.common.config import ConfigScalar, FedqConfig
from fedq.common.strategy_registry import strategy_names
from fedq.simulations.federated_cell import curve, federated_cell
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    HarnessError,
    Summary,
    cell_key,
    name_list,
    register_benchmark,
    results_by_cell,
)
from fedq.simulations.privacy_sweep import learner_overrides
from fedq.simulations.results_io import curve_summary, spread
from fedq.simulations.run import app_defaults

GOAL = 475.0


def _ints(params: Mapping[str, Any], name: str) -> list[int]:
    try:
        values = [int(x) for x in str(params[name]).split(",")]
    except ValueError:
        raise HarnessError(f"{name}: expected comma-separated integers, got "
                           f"{params[name]!r}") from None
    if min(values) < 1:
        raise HarnessError(f"{name}: every value must be >= 1, got {params[name]!r}")
    return values


def _strategies(params: Mapping[str, Any]) -> list[str]:
    return name_list(params, "strategies", strategy_names())


def strategy_settings(strategy: str) -> dict[str, ConfigScalar]:
    """The config of one strategy's runs: a sequential chain decays epsilon on the
    federation's clock (a device joining the chain late must not explore as if the model
    had learnt nothing: docs/benchmarks.md#federation-pays-sequential-rounds)."""
    return {"strategy": strategy,
            **({"exploration-clock": "federation"} if strategy == "sequential" else {})}


def _plan(params: Mapping[str, Any]) -> list[tuple[str, int, int, Cell]]:
    """(strategy, N, seed, cell) of every run; a bad strategy or learner setting fails
    here, naming the config field, before any run starts."""
    learner = learner_overrides(params)
    clients = _ints(params, "clients")
    out = []
    for strategy in _strategies(params):
        settings = {**learner, **strategy_settings(strategy)}
        # validated as config alone (resolve_run_config would also refuse a default
        # run-dir that already holds a run in the working directory)
        FedqConfig.from_mapping({**app_defaults(), **settings})
        for n in clients:
            for seed in range(params["first-seed"], params["first-seed"] + params["seeds"]):
                out.append((strategy, n, seed, federated_cell({
                    **settings, "seed": seed, "local-steps": params["local-steps"],
                    "num-server-rounds": params["max-rounds"],
                    "eval-episodes": max(1, params["eval-episodes-total"] // n)}, n)))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _plan(params)]


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


def run_summary(strategy: str, clients: int, seed: int, result: dict[str, Any]
                ) -> dict[str, Any]:
    """One run's numbers: solved (3 rounds in a row), final, best, overheads, wall time."""
    rows = result["rows"]
    steps, returns = curve(rows)
    summary = curve_summary([(s, r) for s, r in zip(steps, returns, strict=True) if r == r],
                            GOAL)
    solved = summary["solved-at"]
    solved_round = next((r["round"] for r in rows
                         if r["env-steps-per-client-total"] == solved), len(rows))
    train_share, round_share = overhead_shares(rows, clients, result["cores"],
                                               sequential=strategy == "sequential")
    return {"strategy": strategy, "clients": clients, "seed": seed, "ok": result["ok"],
            "status": result["status"], "rounds": len(rows), "steps-per-client": solved,
            "final-return": summary["final-return"], "best-return": summary["best-return"],
            # best.pt replayed on fresh episodes (absent from runs cached before it existed)
            "best-model-return": result.get("best-score"),
            "overhead-share-train-phase": train_share, "overhead-share-round": round_share,
            "seconds-to-solved": sum(r["round-seconds"] for r in rows[:solved_round])
            if solved is not None else None,
            "median-round-seconds": statistics.median(r["round-seconds"] for r in rows[1:])
            if len(rows) > 1 else None,
            # (env steps per client, federated return); None: no device could evaluate
            "curve": [[s, r if r == r else None] for s, r in zip(steps, returns, strict=True)]}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


def table_row(strategy: str, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    solved = [r["steps-per-client"] for r in runs if r["steps-per-client"] is not None]
    median = statistics.median(solved) if solved else None
    return {
        "strategy": strategy, "clients": clients, "solved": f"{len(solved)}/{len(runs)}",
        "median steps/client to solved": median,
        "per seed": ", ".join(f"{r['steps-per-client']:,.0f}" if r["steps-per-client"]
                              is not None else "-" for r in runs),
        "total env steps (median)": clients * median if median is not None else None,
        "final return": spread([r["final-return"] for r in runs
                                if r["final-return"] is not None]),
        "best return": spread([r["best-return"] for r in runs
                               if r["best-return"] is not None]),
        "best model, fresh episodes": spread([
            r["best-model-return"] for r in runs
            if r.get("best-model-return") is not None and r["best-model-return"] == r[
                "best-model-return"]]),  # None: cached before it existed; NaN: no best.pt
        "overhead share, train phase": _median([r["overhead-share-train-phase"]
                                                for r in runs]),
        "overhead share, whole round": _median([r["overhead-share-round"] for r in runs]),
        "median round s": _median([r["median-round-seconds"] for r in runs]),
        "median wall s to solved": _median([r["seconds-to-solved"] for r in runs]),
        "run status": ", ".join(sorted({r["status"] for r in runs}))}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Every run's federated greedy return against env steps per client, one panel per
    strategy, one colour per N, with the goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    fig, axes = plt.subplots(1, len(strategies), figsize=(7 * len(strategies), 4.5),
                             squeeze=False, sharey=True)
    colours = {n: f"C{i}" for i, n in enumerate(sorted({r["clients"] for r in runs}))}
    for ax, strategy in zip(axes[0], strategies, strict=True):
        labelled = set()
        for run in (r for r in runs if r["strategy"] == strategy):
            steps, returns = zip(*run["curve"], strict=True) if run["curve"] else ((), ())
            label = None if run["clients"] in labelled else f"N={run['clients']}"
            labelled.add(run["clients"])
            ax.plot(steps, returns, color=colours[run["clients"]], alpha=0.7, marker=".",
                    label=label)
        ax.axhline(GOAL, color="grey", linestyle=":", label=f"goal {GOAL:g}")
        ax.set_title(f"CartPole-v1, {strategy}")
        ax.set_xlabel("env steps per client")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_ylabel("federated greedy return (each seed a line)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = results_by_cell(done)
    runs = [run_summary(strategy, n, seed, results[cell_key(cell)])
            for strategy, n, seed, cell in _plan(params) if cell_key(cell) in results]
    table = []
    for strategy in _strategies(params):
        base = None
        for n in _ints(params, "clients"):
            mine = [r for r in runs if r["strategy"] == strategy and r["clients"] == n]
            if not mine:
                continue
            row = table_row(strategy, n, mine)
            steps = row["median steps/client to solved"]
            if n == 1:
                base = steps
            row["vs N=1"] = steps / base if steps is not None and base else None
            table.append(row)
    columns = ["strategy", "clients", "solved", "median steps/client to solved", "vs N=1",
               "per seed", "total env steps (median)", "final return", "best return",
               "best model, fresh episodes",
               "overhead share, train phase", "overhead share, whole round",
               "median round s", "median wall s to solved", "run status"]
    learner = learner_overrides(params)
    text = (f"Steps per client are counted at the third round in a row whose federated "
            f"greedy return (mean over {params['eval-episodes-total']} episodes split evenly "
            f"over the clients) reaches {GOAL:g}; '-' in per seed: not solved within "
            f"{params['max-rounds']} rounds of {params['local-steps']:,} local env steps. "
            "Final = the last round's return, best = the best round's, median [min, max] "
            "over seeds; best model, fresh episodes = the run's checkpoints/best.pt (the "
            "best round by federated return, what fedq-export exports) replayed on 30 "
            "fresh greedy episodes. Sequential runs use exploration-clock = federation"
            f"{'; settings ' + str(learner) + ' for every run' if learner else ''}. "
            "Overhead shares are medians over rounds >= 2 (cores per run: "
            f"{', '.join(str(c) for c in sorted({r['cores'] for r in results.values()}))}). "
            "Learning curves: curves.png.")
    return Summary(table, columns, text, payload={"goal": GOAL, "runs": runs},
                   plot=lambda path: plot(runs, path))


BENCHMARK = register_benchmark(Benchmark(
    "federation", "per-client env steps until N homogeneous CartPole devices' global model "
    "solves it (3 rounds in a row), sequential and FedAvg",
    defaults={"strategies": "sequential,fedavg", "clients": "1,2,4,8", "seeds": 5,
              "first-seed": 0, "local-steps": 2500, "max-rounds": 40,
              "eval-episodes-total": 24, "learner": ""},
    quick={"strategies": "sequential", "clients": "1,2", "seeds": 1, "local-steps": 50,
           "max-rounds": 2, "eval-episodes-total": 2},
    cells=cells, summarise=summarise, plot_name="curves.png"))
