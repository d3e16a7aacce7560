"""Does federation pay on heterogeneous devices? Federated vs independent vs centralised.

For each scenario (``simulations/scenarios/``: homogeneous CartPole, heterogeneous
CartPole, heterogeneous Acrobot), each federation size N and each seed, the same N
clients (same physics draws, same device seeds ``seed + 1000 * k``) learn in three ways,
each with the same env steps per client (``--rounds`` x ``--local-steps``):

- **federated**: a real run in Flower's simulation engine (``simulations.run``): FedAvg
  every ``--local-steps``; the final global model is evaluated greedily on every
  client's own env. **personalised** is the same run's final evaluation after each
  client fine-tunes the global model ``--personalize-steps`` on its own env
  (``client/personalize.py``; these steps come on top of the budget).
- **independent**: each client trains its own :class:`common.trainer.LocalTrainer`, in
  this process, no averaging, and is evaluated on its own env. Clients 0..3 of N = 8 are
  exactly the N = 4 clients, so one set of 8 serves both sizes. **independent-longer**
  is the same agents evaluated again after ``--personalize-steps`` more steps: the
  personalised policy's total steps per client, so that comparison is at equal steps too.
- **centralised**: one LocalTrainer stepping all N clients' envs, taking them in turn
  one *episode* each (per-step switching would cut episodes apart), for N x budget
  steps in total; it is evaluated on every client's env. Short-pole clients have
  shorter episodes, so their share of the steps is smaller: the split is recorded.

Every evaluation runs ``--eval-episodes`` greedy episodes with the seeds the federated
run's last round used, so the methods are compared on the same episodes. Reported per
cell: mean over clients and worst client of the mean greedy return; the table gives
their mean over seeds. The federated runs' learning curves (federated evaluation every
round) also give when each was solved (3 rounds in a row at the env's goal,
:func:`simulations.results_io.solved_at`), its final and its best return.

    python -m fedq.simulations.bench federation_pays --workers 2

Cells (:mod:`simulations.pays_cells`, cached and resumed by :mod:`simulations.harness`):
one federated and one centralised per (scenario, N, seed), one independent per (scenario,
seed) at the largest N (clients 0..3 of N = 8 are exactly the N = 4 clients).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedq.simulations.bench_federation_levers import clients_param
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    Summary,
    cell_key,
    name_list,
    register_benchmark,
    results_by_cell,
)
from fedq.simulations.pays_cells import pays_cell
from fedq.simulations.results_io import markdown_table, spread
from fedq.simulations.scenario import SCENARIOS_DIR

METHODS = ("federated", "personalised", "independent", "independent-longer", "centralised")


def _scenarios(params: Mapping[str, Any]) -> list[str]:
    return name_list(params, "scenarios", sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml")))


def _seeds(params: Mapping[str, Any]) -> list[int]:
    return list(range(params["seeds"]))


def _plan(params: Mapping[str, Any]) -> list[tuple[str, str, int, int, Cell]]:
    """(method, scenario, N, seed, cell): the federated and centralised cells per N, one
    independent cell per scenario and seed at the largest N (the smaller N read its first
    clients)."""
    out = []
    largest = max(clients_param(params))
    for name in _scenarios(params):
        for seed in _seeds(params):
            for n in clients_param(params):
                out += [(m, name, n, seed, pays_cell(m, name, n, seed, params))
                        for m in ("federated", "centralised")]
            out.append(("independent", name, largest, seed,
                        pays_cell("independent", name, largest, seed, params)))
    return out


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [cell for *_, cell in _plan(params)]


def collect(params: Mapping[str, Any], done: Done) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Per-client returns of every method per (scenario, N, seed), from the finished cells."""
    finished = results_by_cell(done)
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    for method, name, n, seed, cell in _plan(params):
        if cell_key(cell) not in finished:
            continue
        out = finished[cell_key(cell)]
        if method == "federated":
            results.setdefault((name, n, seed), {}).update(
                federated=out["federated"], personalised=out["personalised"])
            results[(name, n, seed)]["federated-curve"] = out["curve"]
        elif method == "centralised":
            results.setdefault((name, n, seed), {})["centralised"] = out["centralised"]
        else:  # the largest N's independent agents serve every N: its first clients
            for size in clients_param(params):
                results.setdefault((name, size, seed), {}).update(
                    {k: out[k][:size] for k in ("independent", "independent-longer")})
    return results


def method_table(results: dict[tuple[str, int, int], dict[str, Any]],
                 params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per scenario, N and method: mean and worst-client return, averaged over seeds."""
    table = []
    for name in _scenarios(params):
        for n in clients_param(params):
            for method in METHODS:
                per_seed = [results[(name, n, s)][method] for s in _seeds(params)
                            if method in results.get((name, n, s), {})]
                if not per_seed:
                    continue
                table.append({
                    "scenario": name, "N": n, "method": method, "seeds": len(per_seed),
                    "mean return": statistics.mean(float(np.mean(r)) for r in per_seed),
                    "worst-client return": statistics.mean(float(np.min(r))
                                                           for r in per_seed),
                    "worst-client, per seed": ", ".join(f"{min(r):.0f}" for r in per_seed),
                })
    return table


def curve_table(results: dict[tuple[str, int, int], dict[str, Any]],
                params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per scenario and N: the federated runs' solved (3 rounds in a row), final and best
    federated return over seeds."""
    rows = []
    for name in _scenarios(params):
        for n in clients_param(params):
            runs = [results[(name, n, s)]["federated-curve"] for s in _seeds(params)
                    if "federated-curve" in results.get((name, n, s), {})]
            if not runs:
                continue
            solved = [r["solved-at"] for r in runs if r["solved-at"] is not None]
            rows.append({"scenario": name, "N": n, "seeds": len(runs),
                         "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
                         "median steps/client to solved": statistics.median(solved)
                         if solved else None,
                         "final": spread([r["final-return"] for r in runs]),
                         "best": spread([r["best-return"] for r in runs])})
    return rows


def verdicts(table: list[dict[str, Any]]) -> list[str]:
    """The issue's target, per N: on heterogeneous CartPole, does the federated or the
    personalised worst-client return beat the independent agents' worst client at the
    same steps per client? (personalised is held against independent-longer, which has
    taken its fine-tuning steps too)."""
    lines = []
    for n in sorted({r["N"] for r in table if r["scenario"] == "hetero_cartpole"}):
        worst = {r["method"]: r["worst-client return"] for r in table
                 if r["scenario"] == "hetero_cartpole" and r["N"] == n}
        pairs = [("federated", "independent"), ("personalised", "independent-longer")]
        for method, baseline in pairs:
            if method not in worst or baseline not in worst:
                continue
            met = worst[method] > worst[baseline]
            lines.append(f"- hetero_cartpole, N = {n}: {method} worst client "
                         f"{worst[method]:.1f} vs {baseline} {worst[baseline]:.1f}: target "
                         f"{'met' if met else 'NOT met'}")
    return lines


def plot(table: list[dict[str, Any]], params: Mapping[str, Any], path: Path) -> None:
    """Mean return (bars) and worst client (triangles) per method, N and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios, sizes = _scenarios(params), clients_param(params)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4),
                             squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, name in zip(axes[0], scenarios, strict=True):
        for m, method in enumerate(METHODS):
            rows = [r for r in table if r["scenario"] == name and r["method"] == method]
            if not rows:
                continue
            xs = (np.array([sizes.index(r["N"]) for r in rows])
                  + (m - (len(METHODS) - 1) / 2) * width)
            colour = f"C{m}"  # one colour per method in every panel
            ax.bar(xs, [r["mean return"] for r in rows], width, alpha=0.45, color=colour,
                   label=f"{method} (mean)")
            ax.scatter(xs, [r["worst-client return"] for r in rows], marker="v", s=40,
                       color=colour, edgecolor="black", zorder=3,
                       label=f"{method} (worst client)")
        ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
        ax.set_title(name)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"greedy return after {params['rounds'] * params['local-steps']:,} "
                          "env steps per client")
    axes[0][1 if len(scenarios) > 1 else 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = collect(params, done)
    table = method_table(results, params)
    curves = curve_table(results, params)
    parts = ["\n".join(verdicts(table))]
    if curves:
        parts.append("Federated runs, per-round federated evaluation:\n\n" + markdown_table(
            curves, ["scenario", "N", "seeds", "solved (3 in a row)",
                     "median steps/client to solved", "final", "best"]))
    budget = params["rounds"] * params["local-steps"]
    parts.append(f"Equal budget: {params['rounds']} x {params['local-steps']} = {budget:,} "
             "env steps per client for every method (personalised adds "
             f"{params['personalize-steps']} fine-tuning steps per client on top, and is "
             "compared with independent-longer, the independent agents after as many more). "
             f"Returns are greedy, on each client's own env, {params['eval-episodes']} "
             "episodes with the same seeds for every method; mean over clients and worst "
             "client, then averaged over seeds. Plot: federation_pays.png.")
    text = "\n\n".join(part for part in parts if part)
    per_client = {f"{name}/N={n}/seed={s}": v for (name, n, s), v in results.items() if v}
    columns = ["scenario", "N", "method", "seeds", "mean return", "worst-client return",
               "worst-client, per seed"]
    return Summary(table, columns, text, payload={
        "federated-curves": curves, "per-client-returns": per_client,
        "budget-steps-per-client": budget},
        plot=lambda path: plot(table, params, path))


BENCHMARK = register_benchmark(Benchmark(
    "federation_pays", "federated vs independent vs centralised at equal env steps per "
    "client, homogeneous and heterogeneous CartPole and Acrobot",
    defaults={"scenarios": "homo_cartpole,hetero_cartpole,hetero_acrobot", "clients": "4,8",
              "seeds": 3, "rounds": 8, "local-steps": 2500, "eval-episodes": 5,
              "personalize-steps": 1000},
    quick={"scenarios": "homo_cartpole", "clients": "2", "seeds": 1, "rounds": 2,
           "local-steps": 50, "eval-episodes": 1, "personalize-steps": 20},
    cells=cells, summarise=summarise, plot_name="federation_pays.png"))
