"""Where the CarRacing-v3 training loop spends its time, and how much faster the learning
run's settings make it: env frames/s and decisions/s of ``LocalTrainer.train``, split
into env step (physics, rendering and the image wrappers), greedy decision, replay-buffer
add and update, per setting.

Settings (each an edge-cnn over 4 stacked grayscale frames, past ``learning-starts``):

- ``scenario``: ``car_racing_pixels.toml``'s, 84 x 84 frames, a decision every frame,
  an update of 32 every 4 decisions;
- ``learning-run``: :mod:`simulations.carracing_learning`'s, 64 x 64, ``action-repeat``
  4, an update of 64 every 2 decisions;
- ``lean``: 48 x 48, ``action-repeat`` 4, an update of 32 every 4 decisions.

Epsilon is 0.05 throughout, so decisions are mostly greedy (a forward pass each), as in
the bulk of a learning run.

The settings run in alternating blocks inside one cell pinned to one core, so a shared
machine's changing load hits each alike; each figure is the median over the blocks.
Ratios are against ``scenario`` in the same cell.

    python -m fedq.simulations.bench carracing_speed
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from fedq.common.config import FedqConfig
from fedq.common.envs import ImageObs, make_env, wrap_image
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

BASE = {"env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}', "network": "edge-cnn",
        "obs-grayscale": True, "obs-frame-stack": 4, "buffer-size": 5_000,
        "target-update-interval": 1_000, "exploration-initial-eps": 0.05,
        "exploration-final-eps": 0.05}  # late-training acting: mostly greedy decisions
SETTINGS: dict[str, dict[str, Any]] = {
    "scenario": {"obs-resize": 84, "action-repeat": 1, "batch-size": 32,
                 "train-frequency": 4},
    "learning-run": {"obs-resize": 64, "action-repeat": 4, "batch-size": 64,
                     "train-frequency": 2},
    "lean": {"obs-resize": 48, "action-repeat": 4, "batch-size": 32, "train-frequency": 4},
}
PARTS = ("env", "act", "add", "update")


class _Clock:
    """Seconds spent in each instrumented call, by part."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[part] += time.perf_counter() - started
        return timed


def _device(setting: str, learning_starts: int, seed: int) -> tuple[LocalTrainer, _Clock]:
    """A trainer with its env step, decision, buffer add and update timed (instance
    attributes: ``train`` binds them when called, so the loop itself is unchanged)."""
    config = FedqConfig.from_mapping({**BASE, **SETTINGS[setting],
                                      "learning-starts": learning_starts})
    device, clock = LocalTrainer(config, seed=seed), _Clock()
    device.env.step = clock.wrap("env", device.env.step)
    device.learner.policy.act = clock.wrap("act", device.learner.policy.act)
    device.buffer.add = clock.wrap("add", device.buffer.add)
    device.learner.update = clock.wrap("update", device.learner.update)
    return device, clock


def _env_alone(draw_last: bool) -> gym.Env:
    """The learning run's env (64 x 64, 4 stacked, action-repeat 4), its repeated frames
    drawn (gymnasium's RepeatAction) or not (fedq's DrawLastRepeat)."""
    image = ImageObs(True, 64, 4)
    if draw_last:
        return make_env("CarRacing-v3", {"continuous": False}, None, image, action_repeat=4)
    return wrap_image(gym.wrappers.RepeatAction(gym.make("CarRacing-v3", continuous=False), 4),
                      image)


def _env_frames_per_s(env: gym.Env, rng: np.random.Generator, decisions: int) -> float:
    started = time.perf_counter()
    for _ in range(decisions):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(5)))
        if terminated or truncated:
            env.reset()
    return decisions * 4 / (time.perf_counter() - started)


def run_cell(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Every setting: ``learning-starts`` decisions of warm-up, then ``blocks`` timed
    blocks of ``decisions`` each, the settings alternating; in each block also the env
    alone with random actions, drawing every repeated frame or only the last."""
    settings = list(SETTINGS)
    blocks: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    env_alone: dict[str, list[float]] = {"RepeatAction": [], "DrawLastRepeat": []}
    rng = np.random.default_rng(params["seed"])
    with one_core():
        envs = {"RepeatAction": _env_alone(False), "DrawLastRepeat": _env_alone(True)}
        for env in envs.values():
            env.reset(seed=params["seed"])
        devices = {s: _device(s, params["learning-starts"], params["seed"]) for s in settings}
        for device, _ in devices.values():
            device.train(params["learning-starts"])
        for _ in range(params["blocks"]):
            for name, env in envs.items():
                env_alone[name].append(_env_frames_per_s(env, rng, params["decisions"]))
            for setting, (device, clock) in devices.items():
                before = dict(clock.seconds)
                stats = device.train(params["decisions"])
                parts = {p: (clock.seconds[p] - before[p]) * 1e3 / stats.env_steps
                         for p in PARTS}
                repeat = device.config.action_repeat
                blocks[setting].append({
                    "decisions_per_s": stats.env_steps / stats.seconds,
                    "env_frames_per_s": stats.env_steps * repeat / stats.seconds,
                    **{f"{p}_ms": v for p, v in parts.items()},
                    "other_ms": stats.seconds * 1e3 / stats.env_steps - sum(parts.values())})
        for device, _ in devices.values():
            device.close()
        for env in envs.values():
            env.close()
    return {"blocks": blocks, "env_alone": env_alone}


CARRACING_SPEED = CellKind("carracing-speed", run_cell,
                           (*PRODUCT_CODE, "fedq.simulations.bench_carracing_speed"))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [Cell(CARRACING_SPEED, {"decisions": params["decisions"], "blocks": params["blocks"],
                                   "learning-starts": params["learning-starts"],
                                   "seed": params["seed"]})]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    blocks, env_alone = done[0][1]["blocks"], done[0][1]["env_alone"]
    drawn = {name: statistics.median(v) for name, v in env_alone.items()}
    medians = {s: {k: statistics.median(b[k] for b in rows) for k in rows[0]}
               for s, rows in blocks.items()}
    base = medians["scenario"]["env_frames_per_s"]
    rows = [{"setting": s, **{k: SETTINGS[s][k] for k in ("obs-resize", "action-repeat",
                                                          "batch-size", "train-frequency")},
             **{k: round(v, 2) for k, v in m.items()},
             "frames/s vs scenario": round(m["env_frames_per_s"] / base, 2)}
            for s, m in medians.items()]
    columns = ["setting", "obs-resize", "action-repeat", "batch-size", "train-frequency",
               "env_frames_per_s", "decisions_per_s", "env_ms", "act_ms", "add_ms",
               "update_ms", "other_ms", "frames/s vs scenario"]
    return Summary(rows, columns,
                   "Per-decision milliseconds by part (env: one decision's env steps, "
                   "rendering and image wrappers included; update: amortised over "
                   "train-frequency). One core, one torch thread; medians over "
                   f"{params['blocks']} alternating blocks of {params['decisions']} decisions."
                   "\n\nThe learning run's env alone (random actions, 64 x 64, 4 stacked, "
                   "action-repeat 4), env frames/s: gymnasium's RepeatAction (every repeated "
                   f"frame drawn) {drawn['RepeatAction']:.1f}, DrawLastRepeat (only the last) "
                   f"{drawn['DrawLastRepeat']:.1f}, "
                   f"{drawn['DrawLastRepeat'] / drawn['RepeatAction']:.2f}x.",
                   payload={"base": BASE, "settings": SETTINGS, "blocks": blocks,
                            "env_alone_frames_per_s": env_alone})


register_benchmark(Benchmark(
    "carracing_speed", "where the CarRacing-v3 training loop's time goes, per setting",
    defaults={"decisions": 200, "blocks": 5, "learning-starts": 200, "seed": 0},
    quick={"decisions": 40, "blocks": 2, "learning-starts": 20},
    cells=cells, summarise=summarise, parallel=False))
