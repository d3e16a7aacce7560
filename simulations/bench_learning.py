"""Does the local learner learn, and keep what it learns? Greedy return over a budget.

One device (the same ``LocalTrainer`` a Flower client runs) trains on each env for the
whole budget and is evaluated greedily every ``--eval-every`` env steps
(``--eval-episodes`` >= 10 episodes on fresh seeds). A seed counts as solved at the
third evaluation in a row whose mean return reaches the env's goal
(:func:`simulations.results_io.solved_at`); every seed also reports its final and its
best return, so a policy that touches the goal once and collapses shows as such. Each
(env, seed) result is cached under ``runs/bench_learning/`` as it finishes, so an
interrupted benchmark re-run continues instead of starting over.

    python -m fedq.simulations.bench_learning --seeds 5

Goals: CartPole-v1 >= 475 (CleanRL's dqn.py needs ~220k-290k steps for a rolling 475),
Acrobot-v1 >= -100, MountainCar-v0 >= -110. The hyperparameters below are fedq's
defaults for CartPole and RL-Zoo-like settings for the other two; they are the whole
difference between the runs (same code, same learner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedq.common.atomic import atomic_write_text
from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.learning_tasks import TASKS, Task
from fedq.simulations.results_io import curve_summary, markdown_table, spread, write_results

CACHE = Path("runs/bench_learning")


def run_seed(task: Task, seed: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    """Train one seed for the whole step budget, evaluating greedily as it goes."""
    config = FedqConfig.from_mapping({"env-id": task.env_id, **task.overrides})
    trainer = LocalTrainer(config, seed=seed)
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    while trainer.counters.env_steps < task.max_steps:
        trainer.train(eval_every)
        returns = trainer.evaluate(eval_episodes, seed=10**6 + trainer.counters.env_steps)
        curve.append((trainer.counters.env_steps, statistics.fmean(returns)))
    trainer.close()
    return {"env": task.env_id, "seed": seed, **curve_summary(curve, task.goal),
            "seconds": time.perf_counter() - started, "curve": curve}


def cached_run(task: Task, seed: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    path = CACHE / (f"{task.env_id}-seed{seed}-every{eval_every}-ep{eval_episodes}"
                    f"-to{task.max_steps}.json")
    if path.exists():
        return json.loads(path.read_text())
    result = run_seed(task, seed, eval_every, eval_episodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
    return result


def summarise(task: Task, runs: list[dict[str, Any]]) -> dict[str, Any]:
    solved = [r["solved-at"] for r in runs if r["solved-at"] is not None]
    return {"env": task.env_id, "goal": task.goal, "seeds": len(runs),
            "solved (3 in a row)": f"{len(solved)}/{len(runs)}",
            "median steps to solved": statistics.median(solved) if solved else None,
            "final return": spread([r["final-return"] for r in runs]),
            "best return": spread([r["best-return"] for r in runs]),
            "budget": task.max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="CartPole-v1,Acrobot-v1,MountainCar-v0")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=10)
    args = parser.parse_args()
    if args.eval_episodes < 10:
        parser.error("--eval-episodes must be >= 10: fewer make a greedy return too noisy "
                     "to call a task solved")
    torch.set_num_threads(1)
    summaries, all_runs = [], []
    for env_id in args.envs.split(","):
        task = TASKS[env_id]
        runs = []
        for seed in range(args.seeds):
            run = cached_run(task, seed, args.eval_every, args.eval_episodes)
            print(f"{env_id} seed {seed}: solved (3 in a row) at {run['solved-at']} steps, "
                  f"final {run['final-return']:.1f}, best {run['best-return']:.1f} "
                  f"({run['seconds']:.0f}s)", flush=True)
            runs.append(run)
        summaries.append(summarise(task, runs))
        all_runs += runs
    columns = ["env", "goal", "seeds", "solved (3 in a row)", "median steps to solved",
               "final return", "best return", "budget"]
    table = markdown_table(summaries, columns)
    settings = {env_id: {**FedqConfig().to_mapping(), "env-id": env_id, **TASKS[env_id].overrides}
                for env_id in args.envs.split(",")}
    seed_columns = ["env", "seed", "solved-at", "final-return", "best-return"]
    per_seed = markdown_table([{k: r[k] for k in seed_columns} for r in all_runs],
                              seed_columns)
    print(table)
    write_results("learning", {"summary": summaries, "runs": all_runs, "settings": settings,
                               "eval-every": args.eval_every,
                               "eval-episodes": args.eval_episodes},
                  f"{table}\n\nPer seed:\n\n{per_seed}\n\nSolved = the third greedy "
                  f"evaluation in a row (mean of {args.eval_episodes} episodes, every "
                  f"{args.eval_every} env steps) at or above the goal; final = the last "
                  "evaluation of the budget; median [min, max] over seeds. Settings per env "
                  "are in results.json.\n")


if __name__ == "__main__":
    main()
