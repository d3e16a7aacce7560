"""One cell of the federation-levers probe: N devices' round loop replayed in one process.

``bench_federation`` answers "does federation pay" with real runs in Flower's simulation
engine, at minutes per cell; trying a lever there costs an hour. This probe replays the same
round loop in one process, on the same :class:`common.trainer.LocalTrainer` the devices
run, so a lever can be tried over several seeds in minutes:

- every round, each of the N devices (seeds ``seed + 1000 i``, as in the simulation engine)
  loads the global weights into its online network (and into its target network, as the
  ClientApp does, unless the variant says otherwise), trains ``local_steps`` env steps and
  returns its weights; its replay buffer, optimiser and epsilon carry over, as on a device;
- the server moves the global weights by ``server_lr`` times the mean update
  ``mean_i(w_i) - w_global`` (FedAvg is ``server_lr = 1``; devices have equal weight, as
  homogeneous devices with equal env steps have in FedAvg), or, with a server momentum
  ``beta``, by ``server_lr`` times ``v = beta v + (mean - w_global)`` as the ``fedavgm``
  strategy does;
- or, with the ``sequential`` strategy, each device trains the previous device's result
  (server/sequential.py) and the last one's weights are the global model;
- every 500 env steps per device the global model plays 24 greedy episodes; a cell's result
  is the per-device env steps at the third evaluation in a row whose mean return reaches
  475 (:func:`simulations.results_io.solved_at`), beside its final and its best return
  (``first_at_goal`` keeps the first evaluation at the goal, the old result).

What it leaves out on purpose: messages, serialisation, device-state files (none of them
change what is learnt). It is a probe for levers, not a replacement for the benchmark's
numbers, which come from Flower. Its own module (as :mod:`simulations.learning_cell`) so
that a cell's fingerprint hashes this loop, not the benchmark's tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.common.config import FedqConfig
from fedq.common.network_registry import build_network
from fedq.common.networks import NumpyPolicy
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import PRODUCT_CODE, CellKind
from fedq.simulations.results_io import curve_summary

GOAL = 475.0
EVAL_EVERY = 500
EVAL_EPISODES = 24


@dataclass(frozen=True)
class Lever:
    """One way of running the round loop; ``server_lr`` maps N to the server's step and
    ``overrides`` (kebab-case config keys) change every device's learner alike, N = 1
    included, so each lever's N = 1 row is its own baseline."""

    local_steps: int
    server_lr: Callable[[int], float]
    target_from_global: bool = True
    meaning: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    server_momentum: float = 0.0
    sequential: bool = False  # the sequential strategy: devices train one after another
    fresh_optimizer: bool = False  # each device's Adam state starts afresh every round


def server_step(global_weights: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
                server_lr: float, momentum: float, velocity: dict[str, torch.Tensor]) -> None:
    """Move ``global_weights`` in place by ``server_lr`` times the mean update, or times
    the momentum ``velocity`` (updated in place, zeros before the first round) that the
    mean update feeds, as Flower's FedAvgM does."""
    for key, value in global_weights.items():
        mean = sum(u[key] for u in updates) / len(updates)
        if server_lr == 1 and momentum == 0:
            global_weights[key] = mean  # FedAvg: the mean itself, not value + (mean - value)
            continue
        step = mean - value
        if momentum:
            velocity[key] = momentum * velocity[key] + step
            step = velocity[key]
        global_weights[key] = value + server_lr * step


def _one(_: int) -> float:
    return 1.0


def _sqrt(n: int) -> float:
    return n ** 0.5


def _n(n: int) -> float:
    return float(n)


def _two(_: int) -> float:
    return 2.0


LEVERS: dict[str, Lever] = {
    "fedavg-500": Lever(500, _one, meaning="FedAvg every 500 env steps"),
    "fedavg-250": Lever(250, _one, meaning="FedAvg every 250 env steps (= target interval)"),
    "fedavg-10-sync": Lever(
        10, _one, target_from_global=False,
        meaning="FedAvg every 10 env steps, targets on the devices' own 250-step schedule: "
                "close to synchronous data-parallel training with an N-times larger batch"),
    "server-lr-sqrtN-250": Lever(
        250, _sqrt, meaning="every 250 steps, server step sqrt(N) times the mean update "
                            "(the noise of N averaged updates shrinks by sqrt(N))"),
    "server-lr-N-250": Lever(
        250, _n, meaning="every 250 steps, the server adds the devices' updates up (step N "
                         "times the mean), as one learner taking all N devices' updates would"),
    "server-lr-sqrtN-sync10": Lever(
        10, _sqrt, target_from_global=False,
        meaning="every 10 env steps, server step sqrt(N) times the mean update, targets on "
                "the devices' own 250-step schedule"),
    "server-lr-N-sync10": Lever(
        10, _n, target_from_global=False,
        meaning="every 10 env steps, the sum of the devices' updates, targets on the "
                "devices' own 250-step schedule"),
    "lr1e-3-fedavg-2500": Lever(
        2500, _one, overrides={"learning-rate": 1e-3},
        meaning="FedAvg every 2,500 env steps (bench_federation's round), device learning "
                "rate 1e-3"),
    "lr1e-3-slow-eps-fedavg-250": Lever(
        250, _one, overrides={"learning-rate": 1e-3, "exploration-steps": 30_000},
        meaning="FedAvg every 250 env steps, device learning rate 1e-3, epsilon decayed over "
                "30,000 env steps (default 10,000)"),
    "fedavgm-0.8-500": Lever(
        500, _one, server_momentum=0.8,
        meaning="every 500 env steps, server momentum 0.8 on the mean update (FedAvgM)"),
    "fedavgm-0.9-500": Lever(
        500, _one, server_momentum=0.9,
        meaning="every 500 env steps, server momentum 0.9 on the mean update (FedAvgM)"),
    "server-lr-2-2500": Lever(
        2500, _two, meaning="every 2,500 env steps (bench_federation's round), server step "
                            "twice the mean update, for every N"),
    "gs4-fedavg-250": Lever(
        250, _one, overrides={"gradient-steps": 4},
        meaning="FedAvg every 250 env steps, 4 gradient steps per env step (default 1)"),
    "lr1e-3-fedavg-250": Lever(
        250, _one, overrides={"learning-rate": 1e-3},
        meaning="FedAvg every 250 env steps, device learning rate 1e-3 (default 5e-4)"),
    "lr2e-3-fedavg-250": Lever(
        250, _one, overrides={"learning-rate": 2e-3},
        meaning="FedAvg every 250 env steps, device learning rate 2e-3 (default 5e-4)"),
    "sequential-2500": Lever(
        2500, _one, sequential=True, overrides={"exploration-clock": "federation"},
        meaning="strategy sequential (each device trains the previous device's result, "
                "2,500 env steps each per round), epsilon on the federation clock"),
    "device-clock-sequential-2500": Lever(
        2500, _one, sequential=True,
        meaning="strategy sequential, 2,500 env steps per device and round, epsilon on each "
                "device's own clock (the default exploration-clock)"),
    "sequential-500": Lever(
        500, _one, sequential=True, overrides={"exploration-clock": "federation"},
        meaning="strategy sequential, 500 env steps per device and round, epsilon on the "
                "federation clock"),
    "lr2e-3-sequential-500": Lever(
        500, _one, sequential=True,
        overrides={"exploration-clock": "federation", "learning-rate": 2e-3},
        meaning="strategy sequential, 500 env steps per device and round, device learning "
                "rate 2e-3"),
    "lr2e-3-sequential-500-fresh-adam": Lever(
        500, _one, sequential=True, fresh_optimizer=True,
        overrides={"exploration-clock": "federation", "learning-rate": 2e-3},
        meaning="as lr2e-3-sequential-500, each device's Adam moments reset at every visit"),
    "lr2e-3-sequential-2500": Lever(
        2500, _one, sequential=True,
        overrides={"exploration-clock": "federation", "learning-rate": 2e-3},
        meaning="strategy sequential as above, device learning rate 2e-3 (the best lone-"
                "device rate this probe found)"),
}


def run_cell(lever_name: str, clients: int, seed: int, max_steps: int,
             stop_at_goal: bool = True) -> dict[str, Any]:
    """Per-device env steps until the global model's greedy return is at the goal three
    evaluations in a row (``solved_at``); with ``stop_at_goal`` off, training goes on to
    ``max_steps`` so the curve and the final return show whether it stays solved."""
    torch.set_num_threads(1)
    lever = LEVERS[lever_name]
    config = FedqConfig().with_overrides(lever.overrides)
    devices = [LocalTrainer(config, seed=seed + 1000 * i) for i in range(clients)]
    global_weights = {k: v.clone() for k, v in devices[0].learner.online.state_dict().items()}
    online = devices[0].learner.online
    # the global model is evaluated as the ClientApp does: a network and its numpy policy
    # (which reads the network's parameters in place), no trainer or replay buffer
    global_net = build_network(config, online.obs_dim, online.n_actions, "torch")
    greedy = NumpyPolicy(global_net).act
    server_lr = lever.server_lr(clients)
    velocity = {k: torch.zeros_like(v) for k, v in global_weights.items()}
    federation_clock = config.exploration_clock == "federation"
    steps, federation_steps, solved, curve, points = 0, 0, None, [], []
    while steps < max_steps and (solved is None or not stop_at_goal):
        updates = []
        round_start = federation_steps
        for device in devices:
            device.learner.load_online(global_weights, sync_target=lever.target_from_global)
            if lever.fresh_optimizer:
                device.learner.optimizer.state.clear()
            device.train(lever.local_steps, exploration_start=(
                (federation_steps if lever.sequential else round_start)
                if federation_clock else None))
            federation_steps += lever.local_steps
            if lever.sequential:  # the next device starts from this one's result
                global_weights = {k: v.clone() for k, v in
                                  device.learner.online.state_dict().items()}
            else:
                updates.append(device.learner.online.state_dict())
        steps += lever.local_steps
        if updates:
            server_step(global_weights, updates, server_lr, lever.server_momentum, velocity)
        if steps % EVAL_EVERY == 0:
            global_net.load_state_dict(global_weights)
            score = float(np.mean(play_episodes(greedy, config.env_id, EVAL_EPISODES,
                                                seed=10**6 + seed + steps)))
            curve.append(round(score, 1))
            points.append((steps, score))
            solved = curve_summary(points, GOAL)["solved-at"]
    for device in devices:
        device.close()
    summary = curve_summary(points, GOAL)
    return {"lever": lever_name, "clients": clients, "seed": seed, "solved_at": solved,
            "first_at_goal": next((s for s, r in points if r >= GOAL), None),
            "final_return": summary["final-return"], "best_return": summary["best-return"],
            "steps": steps, "curve": curve}


def run_levers_cell(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """The harness's entry: one (lever, N, seed) run (``workdir`` unused: nothing on disk)."""
    return run_cell(params["lever"], params["clients"], params["seed"], params["max-steps"],
                    stop_at_goal=params["stop-at-goal"])


LEVERS_RUN = CellKind("levers-run", run_levers_cell,
                      (*PRODUCT_CODE, "fedq.simulations.levers_cell"))
