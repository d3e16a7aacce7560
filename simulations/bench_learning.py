"""Does the local learner learn, and keep what it learns? Greedy return over a budget.

One device (the same ``LocalTrainer`` a Flower client runs; torch unless the task sets a backend)
trains on each env for the whole budget and is evaluated greedily every ``eval-every``
env steps (``eval-episodes`` >= 10 episodes on fresh seeds). A seed counts as solved at
the third evaluation in a row whose mean return reaches the env's goal
(:func:`simulations.results_io.solved_at`); every seed also reports its final and its
best return, so a policy that touches the goal once and collapses shows as such.

    python -m fedq.simulations.bench learning --workers 2

Cells (:mod:`simulations.harness`): one per (env, seed)
(:mod:`simulations.learning_cell`), cached and resumed by the harness. Envs, goals,
budgets and settings are :data:`simulations.learning_tasks.TASKS`: CartPole-v1 runs
fedq's defaults, the others RL-Zoo-like settings (the whole difference between the runs:
same code, same learner).
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
    Summary,
    name_list,
    register_benchmark,
)
from fedq.simulations.learning_cell import LEARNING_RUN
from fedq.simulations.learning_tasks import TASKS, check_eval_episodes
from fedq.simulations.results_io import markdown_table, spread


def _envs(params: Mapping[str, Any]) -> list[str]:
    return name_list(params, "envs", list(TASKS))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """One cell per (env, seed), envs in the order given (CartPole's seeds first)."""
    check_eval_episodes(params)
    out = []
    for env in _envs(params):
        task = TASKS[env]
        for seed in range(params["seeds"]):
            out.append(Cell(LEARNING_RUN, {
                "env": env, "seed": seed, "goal": task.goal, "settings": dict(task.overrides),
                "max-steps": params["max-steps"] or task.max_steps,
                "eval-every": params["eval-every"] or task.eval_every,
                "eval-episodes": params["eval-episodes"]}))
    return out


def plot(done: Done, path: Path) -> None:
    """Greedy return per evaluation, one panel per env, one line per seed, goal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(c.params["env"] for c, _ in done))
    fig, axes = plt.subplots(1, len(envs), figsize=(5.2 * len(envs), 3.8), squeeze=False)
    for ax, env in zip(axes[0], envs, strict=True):
        for cell, result in done:
            if cell.params["env"] == env and result["curve"]:
                steps, values = zip(*result["curve"], strict=True)
                ax.plot(steps, values, lw=1, label=f"seed {cell.params['seed']}")
        goal = next(c.params["goal"] for c, _ in done if c.params["env"] == env)
        ax.axhline(goal, color="k", ls="--", lw=1, label="goal")
        ax.set_title(env, fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    rows = []
    for env in _envs(params):
        runs = [(c, r) for c, r in done if c.params["env"] == env]
        if not runs:
            continue
        solved = [r["solved-at"] for _, r in runs if r["solved-at"] is not None]
        rows.append({
            "env": env, "goal": TASKS[env].goal, "seeds": len(runs),
            "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
            "median steps to solved": float(statistics.median(solved)) if solved else None,
            "final return": spread([r["final-return"] for _, r in runs]),
            "best return": spread([r["best-return"] for _, r in runs]),
            "budget": runs[0][0].params["max-steps"]})
    per_seed = [{"env": c.params["env"], "seed": c.params["seed"], **{
        k: r[k] for k in ("solved-at", "final-return", "best-return")}} for c, r in done]
    seed_columns = ["env", "seed", "solved-at", "final-return", "best-return"]
    backends = {c.params["env"]: r["backend"] for c, r in done}
    text = (f"Per seed:\n\n{markdown_table(per_seed, seed_columns)}\n\nOne device "
            f"(`LocalTrainer`, backend {', '.join(f'{e} {b}' for e, b in backends.items())}; "
            "torch is fedq's default) per (env, seed). "
            f"Solved = the third greedy evaluation in a row (mean of {params['eval-episodes']} "
            "episodes on fresh seeds, every "
            f"{' / '.join(f'{e:,}' for e in sorted({c.params['eval-every'] for c, _ in done}))} "
            "env steps) at or above the goal; final "
            "= the last evaluation of the budget; median [min, max] over seeds. Settings per "
            "env (overrides of fedq's defaults; CartPole-v1: none) are each cell's `settings` "
            "in `simulations/learning_tasks.py`; learning curves in the plot.")
    columns = ["env", "goal", "seeds", "solved (3 in a row)", "median steps to solved",
               "final return", "best return", "budget"]
    runs = [{"env": c.params["env"], "seed": c.params["seed"], "settings": c.params["settings"],
             **r} for c, r in done]
    return Summary(rows, columns, text, payload={"runs": runs},
                   plot=lambda path: plot(done, path))


# eval-every / max-steps 0: each task's own (learning_tasks.TASKS)
BENCHMARK = register_benchmark(Benchmark(
    "learning", "one device, greedy return over a budget: solved (3 in a row), final, best",
    defaults={"envs": "CartPole-v1,Acrobot-v1", "seeds": 5, "eval-episodes": 10,
              "eval-every": 0, "max-steps": 0},
    quick={"envs": "CartPole-v1", "seeds": 1, "eval-every": 500, "max-steps": 1500},
    cells=cells, summarise=summarise, plot_name="curves.png"))
