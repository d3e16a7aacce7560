"""What the CNN Q-networks cost on this CPU: a DP-SGD update against the plain update,
one greedy decision, env steps/s of the whole CarRacing-v3 training loop, and the size and
latency per decision of each exported ONNX format.

Updates: ``DQNLearner.update`` (fixed batch, global clip) against
``PrivateDQNLearner.update`` (Poisson batch of the same expected size, per-sample
gradients from Opacus's ``GradSampleModule``, clip, noise, accountant step), each network
on 4 x 84 x 84 uint8 frames read from a filled :class:`common.frame_buffer.FrameReplayBuffer`;
the two alternate in blocks so drift on a shared machine hits both alike, and each row is
the median over every timed update. Decision: ``learner.policy.act`` on one stacked
observation. Loop: ``LocalTrainer.train`` on discrete CarRacing (grayscale, 84 x 84, 4
frames, an update every 4 env steps after ``learning-starts``) against the same env
stepped with random actions alone, in alternating blocks. Export:
``common.export.cnn_export.export_cnn`` of each network (untrained: size and latency do not
depend on the weights), agreement with torch on 100 random frames, onnxruntime with one
thread.

One cell per network, pinned to one core with one torch thread; the networks run one after
the other (a timing benchmark: cells never share the CPU).

    python -m fedq.simulations.bench cnn
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from fedq.common.config import FedqConfig
from fedq.common.dqn import DQNLearner, PrivateDQNLearner
from fedq.common.envs import ImageObs, make_env
from fedq.common.export.onnx_export import onnx_available
from fedq.common.frame_buffer import FrameReplayBuffer
from fedq.common.network_registry import IMAGE, build_network, network_names, network_spec
from fedq.common.privacy import DevicePrivacy
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    Summary,
    name_list,
    one_core,
    register_benchmark,
)
from fedq.simulations.results_io import markdown_table

STACK, SIDE, N_ACTIONS = 4, 84, 5  # CarRacing-v3 discrete, grayscale 84x84, 4 frames
CAR = {"env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}', "obs-grayscale": True,
       "obs-resize": SIDE, "obs-frame-stack": STACK}


def _filled_buffer(n: int, batch: int) -> FrameReplayBuffer:
    rng = np.random.default_rng(0)
    buf = FrameReplayBuffer(n, (STACK, SIDE, SIDE), batch, seed=0)
    obs = rng.integers(0, 256, (STACK, SIDE, SIDE), dtype=np.uint8)
    for t in range(n):
        nxt = np.concatenate([obs[1:], rng.integers(0, 256, (1, SIDE, SIDE), np.uint8)])
        buf.add(obs, t % N_ACTIONS, float(rng.normal()), nxt, False)
        obs = nxt
    return buf


def time_updates(network: str, batch: int, blocks: int, per_block: int) -> dict:
    config = FedqConfig.from_mapping({**CAR, "network": network, "batch-size": batch,
                                      "buffer-size": 2048, "dp-enabled": True})
    space = gym.spaces.Box(0, 255, (STACK, SIDE, SIDE), np.uint8)
    buf = _filled_buffer(2048, batch)
    plain = DQNLearner(space, N_ACTIONS, config)
    private = PrivateDQNLearner(space, N_ACTIONS, config, DevicePrivacy(config))
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for learner in (plain, private):
        learner.bind(buf)
        learner.update()  # warm-up: first-call allocations and kernel choice
    for _ in range(blocks):
        for name, learner in (("plain", plain), ("dp", private)):
            for _ in range(per_block):
                start = time.perf_counter()
                learner.update()
                times[name].append(time.perf_counter() - start)
    obs = buf.gather_arrays(np.arange(1))[0][0]
    decisions = []
    for _ in range(50):
        start = time.perf_counter()
        plain.policy.act(obs)
        decisions.append(time.perf_counter() - start)
    plain_ms = statistics.median(times["plain"]) * 1e3
    dp_ms = statistics.median(times["dp"]) * 1e3
    return {"network": network, "batch": batch,
            "parameters": sum(p.numel() for p in plain.online.parameters()),
            "fp32_bytes": sum(p.numel() * 4 for p in plain.online.parameters()),
            "plain_update_ms": plain_ms, "dp_update_ms": dp_ms, "dp_over_plain": dp_ms / plain_ms,
            "decision_ms": statistics.median(decisions) * 1e3,
            "timed_updates": len(times["plain"])}


def time_loop(network: str, steps: int, learning_starts: int, blocks: int = 4) -> dict:
    """The training loop and the env alone, in alternating blocks of ``steps / blocks``
    env steps, so a shared machine's changing load hits both alike."""
    config = FedqConfig.from_mapping({**CAR, "network": network, "buffer-size": 10_000,
                                      "batch-size": 32, "learning-starts": learning_starts,
                                      "train-frequency": 4, "target-update-interval": 1000})
    env = make_env("CarRacing-v3", {"continuous": False}, None, ImageObs.of(config))
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    device = LocalTrainer(config, seed=0)
    env_seconds, loop_seconds, updates, per_block = 0.0, 0.0, 0, steps // blocks
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(N_ACTIONS)))
            if terminated or truncated:
                env.reset()
        env_seconds += time.perf_counter() - start
        stats = device.train(per_block)
        loop_seconds += stats.seconds
        updates += stats.updates
    env.close()
    device.close()
    env_only, loop = blocks * per_block / env_seconds, blocks * per_block / loop_seconds
    return {"network": network, "env_steps": blocks * per_block, "updates": updates,
            "env_only_steps_per_s": env_only, "loop_steps_per_s": loop,
            "loop_over_env_only": loop / env_only}


def time_export(network: str, out: Path) -> list[dict]:
    from fedq.common.export.cnn_export import CNN_FORMATS, export_cnn

    torch.manual_seed(0)
    space = gym.spaces.Box(0, 255, (STACK, SIDE, SIDE), np.uint8)
    net = build_network(FedqConfig(network=network), space, N_ACTIONS)
    frames = np.random.default_rng(0).integers(0, 256, (100, STACK, SIDE, SIDE), np.uint8)
    entries = export_cnn(net, out / network, list(CNN_FORMATS), frames,
                         {"network": network}, log=lambda _: None)
    return [{"network": network, "format": name, **entry} for name, entry in entries.items()]


def run_network(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One network: its updates and decision, the training loop against the env alone,
    and its exported ONNX formats (written under the cell's scratch folder; none without
    the ``export`` extra, as ``bench export`` does)."""
    network = params["network"]
    with one_core():
        updates = time_updates(network, params["batch"], params["blocks"],
                               params["per-block"])
        loop = time_loop(network, params["loop-steps"], params["learning-starts"])
        exports = time_export(network, workdir) if onnx_available() else []
    return {"updates": updates, "loop": loop, "export": exports}


CNN_NETWORK = CellKind("cnn-network", run_network,
                       (*PRODUCT_CODE, "fedq.simulations.bench_cnn"))


def _networks(params: Mapping[str, Any]) -> list[str]:
    """The ``networks`` to measure, each a registered network that reads image frames (an
    MLP or a typo fails here, naming the parameter, before any cell runs)."""
    image_networks = [n for n in network_names() if IMAGE in network_spec(n).observations]
    return name_list(params, "networks", image_networks)


def cells(params: Mapping[str, Any]) -> list[Cell]:
    return [Cell(CNN_NETWORK, {"network": network, **{k: params[k] for k in (
        "batch", "blocks", "per-block", "loop-steps", "learning-starts")}})
            for network in _networks(params)]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    updates = [result["updates"] for _, result in done]
    loops = [result["loop"] for _, result in done]
    exports = [row for _, result in done for row in result["export"]]
    text = ("One core, one torch thread, 4 x 84 x 84 frames. Updates: medians over "
            f"{params['blocks']} alternating blocks of {params['per-block']} plain and DP-SGD "
            "updates. The CarRacing training loop (an update every 4 env steps after "
            f"{params['learning-starts']}) against the env alone, in alternating blocks:\n\n"
            + markdown_table(loops, ["network", "env_steps", "updates", "env_only_steps_per_s",
                                     "loop_steps_per_s", "loop_over_env_only"])
            + "\n\nExported ONNX formats of each (untrained) network: size, greedy-action "
            "agreement with torch on 100 random frames, onnxruntime with one thread:\n\n"
            + (markdown_table(exports, ["network", "format", "bytes", "agreement",
                                        "decision_ms"]) if exports else
               "none: the export extra (onnx, onnxscript, onnxruntime) is not installed."))
    return Summary(updates, ["network", "batch", "parameters", "fp32_bytes", "plain_update_ms",
                             "dp_update_ms", "dp_over_plain", "decision_ms"], text,
                   payload={"loop": loops, "export": exports})


register_benchmark(Benchmark(
    "cnn", "what the CNN Q-networks cost on this CPU: DP-SGD vs plain update, a greedy "
    "decision, the CarRacing loop, exported ONNX formats",
    defaults={"networks": "edge-cnn,nature-cnn", "batch": 32, "blocks": 3, "per-block": 5,
              "loop-steps": 400, "learning-starts": 100},
    quick={"networks": "edge-cnn", "batch": 8, "blocks": 1, "per-block": 1, "loop-steps": 40,
           "learning-starts": 20},
    cells=cells, summarise=summarise, parallel=False))
