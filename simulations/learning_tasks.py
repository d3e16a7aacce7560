"""The single-device learning tasks the benchmarks share: an env, its goal, its step
budget and the settings it runs with.

CartPole runs fedq's defaults; the other envs RL-Zoo-like settings (the whole difference
between runs is these overrides: same code, same learner). Goals are the envs' usual
"solved" thresholds; budgets are what issue 20 sets (CartPole 150k, LunarLander 500k).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedq.common.config import ConfigScalar
from fedq.simulations.harness import HarnessError


@dataclass(frozen=True)
class Task:
    """An env, the greedy return that counts as solved, and the settings used for it."""

    env_id: str
    goal: float
    max_steps: int
    overrides: dict[str, ConfigScalar]
    eval_every: int = 2500  # env steps between greedy evaluations


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
        "exploration-steps": 24_000, "exploration-final-eps": 0.07,
        "learning-rate-decay-steps": 200_000}),  # the lr decays over its whole budget
    # RL Zoo's DQN LunarLander (256-256, lr 6.3e-4, batch 128, train every 4 steps with 4
    # gradient steps, target every 250, 12% of 100k steps of epsilon decay to 0.1); needs
    # the box2d extra. The lr decays over the whole 500k budget, not the default 150k
    # (which leaves it 0 for the last 350k steps). td-target-clip auto does not clip here:
    # LunarLander's per-step reward has no range in common/return_bounds.py. The numpy
    # backend: 1.13x torch's env steps per CPU-second on this network (docs/benchmarks.md).
    "LunarLander-v3": Task("LunarLander-v3", 200.0, 500_000, {
        "hidden-sizes": "256,256", "learning-rate": 6.3e-4, "batch-size": 128,
        "buffer-size": 50_000, "learning-starts": 1000, "train-frequency": 4,
        "gradient-steps": 4, "target-update-interval": 250,
        "exploration-steps": 12_000, "exploration-final-eps": 0.1,
        "learning-rate-decay-steps": 500_000, "backend": "numpy"}, eval_every=10_000),
}

MIN_EVAL_EPISODES = 10  # fewer make a greedy return too noisy to call a task solved


def check_eval_episodes(params: Mapping[str, Any]) -> None:
    """Refuse a benchmark's ``eval-episodes`` below :data:`MIN_EVAL_EPISODES` (the one
    rule of every single-device learning benchmark on these tasks)."""
    if params["eval-episodes"] < MIN_EVAL_EPISODES:
        raise HarnessError(f"eval-episodes must be >= {MIN_EVAL_EPISODES}: fewer make a "
                           "greedy return too noisy to call a task solved")
