"""One device learning CarRacing-v3 (discrete) from pixels on this CPU, as a harness cell:
a greedy learning curve against the random policy, checkpointed so a killed run loses
nothing (the ``carracing`` and ``carracing_federated`` benchmarks,
:mod:`simulations.bench_carracing`).

The loop is :class:`common.trainer.LocalTrainer` itself. Every ``eval-every`` decisions
it plays ``eval-episodes`` greedy episodes on fixed tracks (the same tracks at every
evaluation, and the same ones the random policy is scored on) and saves the device's
whole state (networks, optimizer, replay buffer, counters, RNGs) and the curve so far
beside the cell's scratch folder (:func:`simulations.learning_cell.resume_dir`): the
same command run again resumes from the last evaluation. Its own module so that the
cell's fingerprint hashes this loop, not the benchmark's tables.

Steps are counted two ways: decisions (what ``local-steps``, ``exploration-steps`` and
the other step keys count) and env frames (decisions x ``action-repeat``, what
CarRacing's 1000-frame episodes and the literature count).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedq.common.atomic import atomic_write_text
from fedq.common.config import FedqConfig
from fedq.common.envs import ImageObs, run_env_spec
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import PRODUCT_CODE, CellKind
from fedq.simulations.learning_cell import resume_dir

EVAL_SEED = 10**6  # the greedy and the random policy drive the same tracks
TARGET = 300.0  # issue 19's single-device target
CURVE = "curve.json"  # the random policy's returns and the points so far, in resume_dir
RUN = {
    "env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}', "network": "edge-cnn",
    "obs-grayscale": True, "obs-resize": 64, "obs-frame-stack": 4, "action-repeat": 4,
    "buffer-size": 50_000, "batch-size": 64, "learning-rate": 2.5e-4,
    "learning-starts": 2_000, "train-frequency": 2, "target-update-interval": 1_000,
    "exploration-steps": 20_000, "exploration-final-eps": 0.05, "gamma": 0.99,
}
"""The run's config: 64 x 64 grayscale frames, 4 stacked, each decision held for 4 frames
(CarRacing's 1000-frame episode is 250 decisions), an update of 64 transitions every 2
decisions, epsilon from 1 to 0.05 over the first 20,000 decisions."""


def build_config(overrides: Mapping[str, Any]) -> FedqConfig:
    """The run's config with the benchmark's overrides, checked like any fedq run (env,
    network and replay-buffer memory) before training starts."""
    config = FedqConfig.from_mapping({**RUN, **overrides})
    run_env_spec(config)
    return config


def random_returns(config: FedqConfig, episodes: int) -> list[float]:
    """The uniformly random policy on the evaluation tracks, through the same wrappers."""
    rng = np.random.default_rng(0)
    n_actions = run_env_spec(config).n_actions
    return play_episodes(lambda _obs: int(rng.integers(n_actions)), config.env_id, episodes,
                         seed=EVAL_SEED, env_kwargs=config.env_kwargs,
                         image=ImageObs.of(config), action_repeat=config.action_repeat)


def run_carracing(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Train ``params["decisions"]`` decisions of :data:`RUN` with ``params["overrides"]``
    (a mapping of config keys), evaluated every ``eval-every``; returns the random
    policy's returns and one point per evaluation."""
    torch.set_num_threads(1)
    config = build_config(params["overrides"])
    resume = resume_dir(workdir)
    resume.mkdir(exist_ok=True)
    state_file = resume / CURVE
    if state_file.exists():
        state = json.loads(state_file.read_text())
    else:
        started = time.perf_counter()
        state = {"action_repeat": config.action_repeat, "eval_seed": EVAL_SEED,
                 "random_returns": random_returns(config, params["eval-episodes"]),
                 "points": [], "resumed-at": []}
        state["random_seconds"] = time.perf_counter() - started
        atomic_write_text(state_file, json.dumps(state, indent=1))
    device = LocalTrainer(config, seed=params["seed"])
    try:
        if device.load(resume / "device"):
            # the curve is written before the state: drop points the state never reached
            steps = device.counters.env_steps
            state["points"] = [p for p in state["points"] if p["decisions"] <= steps]
            state["resumed-at"].append(steps)
            print(f"[carracing] resumed at {steps} decisions", flush=True)
        while device.counters.env_steps < params["decisions"]:
            chunk = min(params["eval-every"] - device.counters.env_steps % params["eval-every"],
                        params["decisions"] - device.counters.env_steps)
            stats = device.train(chunk)
            started = time.perf_counter()
            greedy = device.evaluate(params["eval-episodes"], seed=EVAL_SEED)
            decisions = device.counters.env_steps
            state["points"].append({
                "decisions": decisions, "env_frames": decisions * config.action_repeat,
                "updates": device.counters.updates, "epsilon": stats.epsilon,
                "greedy_mean": statistics.fmean(greedy), "greedy_returns": greedy,
                "train_returns": stats.episode_returns, "mean_loss": stats.mean_loss,
                "train_seconds": stats.seconds, "decisions_per_s": stats.env_steps / stats.seconds,
                "eval_seconds": time.perf_counter() - started,
                "load_average": os.getloadavg()[0], "time": time.strftime("%H:%M:%S")})
            atomic_write_text(state_file, json.dumps(state, indent=1))
            device.save(resume / "device")
            p = state["points"][-1]
            print(f"[carracing] {p['time']} decisions {decisions} eps {p['epsilon']:.2f} greedy "
                  f"{p['greedy_mean']:.1f} {[round(g) for g in greedy]} "
                  f"{p['decisions_per_s']:.1f} dec/s load {p['load_average']:.1f}", flush=True)
    finally:
        device.close()
    shutil.rmtree(resume, ignore_errors=True)  # finished: the harness caches the result
    return state


CARRACING_RUN = CellKind("carracing-run", run_carracing,
                         (*PRODUCT_CODE, "fedq.simulations.carracing_learning"))
