"""Env steps per second of fedq's local learner vs Stable-Baselines3's DQN, side by side.

Both run CleanRL's CartPole-v1 schedule (MLP 120-84, lr 2.5e-4, buffer 10k, batch 128,
learning_starts 10k, train every 10 steps, target sync every 500 steps, epsilon 1 -> 0.05
over 250k steps, Huber loss, grad-norm clip 10, plain DQN target), on one core with one
torch thread, alternating fedq and SB3 runs in this one process. A second schedule
starts at epsilon 0.05 so greedy acting (the late-training regime) dominates.

    taskset -c 0 python -m fedq.simulations.bench_speed --steps 50000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.results_io import markdown_table, write_results

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, initial_eps in SCHEDULES.items():
        fedq, sb3 = [], []
        for rep in range(args.repeats):
            fedq.append(fedq_steps_per_second(args.steps, initial_eps, seed=rep))
            sb3.append(sb3_steps_per_second(args.steps, initial_eps, seed=rep))
            print(f"{name} rep {rep}: fedq {fedq[-1]:,.0f} steps/s, SB3 {sb3[-1]:,.0f} steps/s",
                  flush=True)
        ratios = [f / s for f, s in zip(fedq, sb3, strict=True)]
        rows.append({"schedule": name, "steps": args.steps, "repeats": args.repeats,
                     "fedq steps/s (median)": statistics.median(fedq),
                     "SB3 steps/s (median)": statistics.median(sb3),
                     "ratio fedq/SB3 (median of paired)": statistics.median(ratios),
                     "fedq runs": fedq, "sb3 runs": sb3})
    columns = ["schedule", "steps", "repeats", "fedq steps/s (median)", "SB3 steps/s (median)",
               "ratio fedq/SB3 (median of paired)"]
    table = markdown_table(rows, columns)
    print(table)
    folder = write_results("speed", {"config": CLEANRL, "rows": rows}, table)
    print(f"results in {folder}")


if __name__ == "__main__":
    main()
