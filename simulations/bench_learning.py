"""Does the local learner learn, on more than one env? Env steps to a greedy-return goal.

One device (the same ``LocalTrainer`` a Flower client runs) trains on each env and is
evaluated greedily every ``--eval-every`` env steps (``--eval-episodes`` episodes on
fresh seeds). A seed counts as solved at the first evaluation whose mean return reaches
the env's goal. Each (env, seed) result is cached under ``runs/bench_learning/`` as it
finishes, so an interrupted benchmark re-run continues instead of starting over.

    python -m simulations.bench_learning --seeds 5

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_text
from common.config import ConfigScalar, FedqConfig
from common.trainer import LocalTrainer
from simulations.results_io import markdown_table, write_results


@dataclass(frozen=True)
class Task:
    """An env, the greedy return that counts as solved, and the settings used for it."""

    env_id: str
    goal: float
    max_steps: int
    overrides: dict[str, ConfigScalar]


TASKS = {
    "CartPole-v1": Task("CartPole-v1", 475.0, 150_000, {}),  # fedq's defaults
    "Acrobot-v1": Task("Acrobot-v1", -100.0, 150_000, {
        "hidden-sizes": "256,256", "learning-rate": 6.3e-4, "batch-size": 128,
        "buffer-size": 50_000, "learning-starts": 1000, "train-frequency": 4,
        "gradient-steps": 4, "target-update-interval": 250,
        "exploration-steps": 12_000, "exploration-final-eps": 0.1}),
    "MountainCar-v0": Task("MountainCar-v0", -110.0, 200_000, {
        "hidden-sizes": "256,256", "learning-rate": 4e-3, "batch-size": 128,
        "buffer-size": 10_000, "learning-starts": 1000, "gamma": 0.98, "train-frequency": 16,
        "gradient-steps": 8, "target-update-interval": 600,
        "exploration-steps": 24_000, "exploration-final-eps": 0.07}),
}
CACHE = Path("runs/bench_learning")


def run_seed(task: Task, seed: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    """Train one seed until its greedy evaluation reaches the goal or the step budget ends."""
    config = FedqConfig.from_mapping({"env-id": task.env_id, **task.overrides})
    trainer = LocalTrainer(config, seed=seed)
    curve: list[tuple[int, float]] = []
    solved_at = None
    started = time.perf_counter()
    while trainer.counters.env_steps < task.max_steps:
        trainer.train(eval_every)
        returns = trainer.evaluate(eval_episodes, seed=10**6 + trainer.counters.env_steps)
        curve.append((trainer.counters.env_steps, statistics.fmean(returns)))
        if curve[-1][1] >= task.goal:
            solved_at = trainer.counters.env_steps
            break
    trainer.close()
    return {"env": task.env_id, "seed": seed, "solved": solved_at is not None,
            "steps-to-goal": solved_at, "last-eval-return": curve[-1][1],
            "best-eval-return": max(r for _, r in curve), "seconds": time.perf_counter() - started,
            "curve": curve}


def cached_run(task: Task, seed: int, eval_every: int, eval_episodes: int) -> dict[str, Any]:
    path = CACHE / f"{task.env_id}-seed{seed}-every{eval_every}-ep{eval_episodes}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = run_seed(task, seed, eval_every, eval_episodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result))
    return result


def summarise(task: Task, runs: list[dict[str, Any]]) -> dict[str, Any]:
    solved = [r["steps-to-goal"] for r in runs if r["solved"]]
    return {"env": task.env_id, "goal": task.goal, "seeds": len(runs),
            "solved": f"{len(solved)}/{len(runs)}",
            "median steps to goal": statistics.median(solved) if solved else None,
            "max steps to goal": max(solved) if solved else None,
            "budget": task.max_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default=",".join(TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    summaries, all_runs = [], []
    for env_id in args.envs.split(","):
        task = TASKS[env_id]
        runs = []
        for seed in range(args.seeds):
            run = cached_run(task, seed, args.eval_every, args.eval_episodes)
            print(f"{env_id} seed {seed}: solved={run['solved']} at {run['steps-to-goal']} "
                  f"steps, best {run['best-eval-return']:.1f} ({run['seconds']:.0f}s)",
                  flush=True)
            runs.append(run)
        summaries.append(summarise(task, runs))
        all_runs += runs
    columns = ["env", "goal", "seeds", "solved", "median steps to goal", "max steps to goal",
               "budget"]
    table = markdown_table(summaries, columns)
    settings = {env_id: {**FedqConfig().to_mapping(), "env-id": env_id, **TASKS[env_id].overrides}
                for env_id in args.envs.split(",")}
    per_seed = markdown_table(
        [{k: r[k] for k in ("env", "seed", "solved", "steps-to-goal", "best-eval-return")}
         for r in all_runs], ["env", "seed", "solved", "steps-to-goal", "best-eval-return"])
    print(table)
    write_results("learning", {"summary": summaries, "runs": all_runs, "settings": settings,
                               "eval-every": args.eval_every,
                               "eval-episodes": args.eval_episodes},
                  f"{table}\n\nPer seed:\n\n{per_seed}\n\nSolved = first greedy evaluation "
                  f"(mean of {args.eval_episodes} episodes, every {args.eval_every} env steps) "
                  "at or above the goal. Settings per env are in results.json.\n")


if __name__ == "__main__":
    main()
