"""Env steps per second of fedq's local learner vs Stable-Baselines3's DQN, side by side.

Both run CleanRL's CartPole-v1 schedule (MLP 120-84, lr 2.5e-4, buffer 10k, batch 128,
learning_starts 10k, train every 10 steps, target sync every 500 steps, epsilon 1 -> 0.05
over 250k steps, Huber loss, grad-norm clip 10, plain DQN target), on one core with one
torch thread, alternating fedq and SB3 runs in this one process. A second schedule
starts at epsilon 0.05 so greedy acting (the late-training regime) dominates.

    python -m fedq.simulations.bench speed      # each cell pinned to one core

Each (schedule, repeat) is one ``speed-pair`` cell of :mod:`simulations.harness`: a fedq run
and then an SB3 run of the same seed, back to back, so each ratio is of a pair that met
the same machine state. SB3 is not a fedq dependency: without it the cell times fedq alone
and the SB3 columns are empty.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    Summary,
    one_core,
    register_benchmark,
)

CLEANRL = {"hidden-sizes": "120,84", "learning-rate": 2.5e-4, "buffer-size": 10_000,
           "batch-size": 128, "learning-starts": 10_000, "train-frequency": 10,
           "gradient-steps": 1, "target-update-interval": 500, "gamma": 0.99,
           "exploration-initial-eps": 1.0, "exploration-final-eps": 0.05,
           "exploration-steps": 250_000, "loss": "huber", "max-grad-norm": 10.0,
           "double-dqn": False}
SCHEDULES = {"cleanrl (eps 1 -> 0.05 over 250k)": 1.0, "greedy phase (eps 0.05)": 0.05}


def fedq_steps_per_second(steps: int, initial_eps: float, seed: int) -> float:
    config = FedqConfig.from_mapping({**CLEANRL, "exploration-initial-eps": initial_eps})
    trainer = LocalTrainer(config, seed=seed)
    started = time.perf_counter()
    trainer.train(steps)
    return steps / (time.perf_counter() - started)


def sb3_steps_per_second(steps: int, initial_eps: float, seed: int) -> float:
    from stable_baselines3 import DQN

    c = CLEANRL
    model = DQN(
        "MlpPolicy", "CartPole-v1", learning_rate=c["learning-rate"],
        buffer_size=c["buffer-size"], learning_starts=c["learning-starts"],
        batch_size=c["batch-size"], gamma=c["gamma"], train_freq=c["train-frequency"],
        gradient_steps=c["gradient-steps"], target_update_interval=c["target-update-interval"],
        # SB3 decays over a fraction of this learn() call: scale it to 250k steps
        exploration_fraction=c["exploration-steps"] / steps,
        exploration_initial_eps=initial_eps, exploration_final_eps=c["exploration-final-eps"],
        max_grad_norm=c["max-grad-norm"], policy_kwargs={"net_arch": [120, 84]},
        seed=seed, device="cpu", verbose=0)
    started = time.perf_counter()
    model.learn(total_timesteps=steps, progress_bar=False)
    return steps / (time.perf_counter() - started)


def run_pair(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One ``speed-pair`` cell on one core: fedq's steps/s, then SB3's (None without
    SB3)."""
    initial_eps = SCHEDULES[params["schedule"]]
    with one_core():
        fedq = fedq_steps_per_second(params["steps"], initial_eps, seed=params["seed"])
        sb3 = None
        if importlib.util.find_spec("stable_baselines3") is not None:
            sb3 = sb3_steps_per_second(params["steps"], initial_eps, seed=params["seed"])
    return {"fedq": fedq, "sb3": sb3}


SPEED_PAIR = CellKind("speed-pair", run_pair, (*PRODUCT_CODE, "fedq.simulations.bench_speed"))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    schedules = [s for s in SCHEDULES if params["schedules"] == "all" or
                 s.startswith(str(params["schedules"]))]
    return [Cell(SPEED_PAIR, {"schedule": name, "steps": params["steps"], "seed": rep})
            for name in schedules for rep in range(params["repeats"])]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    by_schedule: dict[str, list[dict[str, Any]]] = {}
    for cell, result in done:
        by_schedule.setdefault(cell.params["schedule"], []).append(result)
    rows = []
    for name, pairs in by_schedule.items():
        fedq = [p["fedq"] for p in pairs]
        sb3 = [p["sb3"] for p in pairs if p["sb3"] is not None]
        ratios = [p["fedq"] / p["sb3"] for p in pairs if p["sb3"] is not None]
        rows.append({"schedule": name, "steps": params["steps"], "repeats": len(pairs),
                     "fedq steps/s (median)": statistics.median(fedq),
                     "SB3 steps/s (median)": statistics.median(sb3) if sb3 else None,
                     "ratio fedq/SB3 (median of paired)":
                         statistics.median(ratios) if ratios else None,
                     "fedq runs": fedq, "sb3 runs": sb3})
    columns = ["schedule", "steps", "repeats", "fedq steps/s (median)", "SB3 steps/s (median)",
               "ratio fedq/SB3 (median of paired)"]

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.4))
        for i, row in enumerate(rows):
            ax.scatter([i - 0.1] * len(row["fedq runs"]), row["fedq runs"], color="C0",
                       label="fedq" if i == 0 else None)
            ax.scatter([i + 0.1] * len(row["sb3 runs"]), row["sb3 runs"], color="C1",
                       label="SB3" if i == 0 else None)
        ax.set_xticks(range(len(rows)), [r["schedule"] for r in rows], fontsize=8)
        ax.set_ylabel("env steps / s (one core)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Summary(rows, columns, "CleanRL's CartPole schedule on one core, one torch thread "
                   "(the harness pins each cell to one core).", payload={"config": CLEANRL},
                   plot=plot)


register_benchmark(Benchmark(
    "speed", "env steps/s of the local learner vs Stable-Baselines3 DQN, CleanRL's schedule",
    defaults={"steps": 60_000, "repeats": 5, "schedules": "all"},
    quick={"steps": 1_000, "repeats": 1, "schedules": "greedy"},
    cells=cells, summarise=summarise, parallel=False))
