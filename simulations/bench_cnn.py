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
frames, an update every 4 env steps after ``--learning-starts``) against the same env
stepped with random actions alone, in alternating blocks. Export:
``common.export.cnn_export.export_cnn`` of each network (untrained: size and latency do not
depend on the weights), agreement with torch on 100 random frames, onnxruntime with one
thread.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python -m fedq.simulations.bench_cnn
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from fedq.common.config import FedqConfig
from fedq.common.dqn import DQNLearner, PrivateDQNLearner
from fedq.common.envs import ImageObs, make_env
from fedq.common.frame_buffer import FrameReplayBuffer
from fedq.common.network_registry import build_network
from fedq.common.privacy import DevicePrivacy
from fedq.common.trainer import LocalTrainer
from fedq.simulations.results_io import markdown_table, write_results

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--per-block", type=int, default=5)
    parser.add_argument("--loop-steps", type=int, default=400)
    parser.add_argument("--learning-starts", type=int, default=100)
    parser.add_argument("--networks", default="edge-cnn,nature-cnn")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # a shared machine's load inflates every time alike
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    updates = [time_updates(n, args.batch, args.blocks, args.per_block) for n in networks]
    loops = [time_loop(n, args.loop_steps, args.learning_starts) for n in networks]
    with tempfile.TemporaryDirectory() as tmp:
        exports = [row for n in networks for row in time_export(n, Path(tmp))]
    tables = (markdown_table(updates, ["network", "batch", "parameters", "fp32_bytes",
                                       "plain_update_ms", "dp_update_ms", "dp_over_plain",
                                       "decision_ms"])
              + "\n\n" + markdown_table(loops, ["network", "env_steps", "updates",
                                                 "env_only_steps_per_s", "loop_steps_per_s",
                                                 "loop_over_env_only"])
              + "\n\n" + markdown_table(exports, ["network", "format", "bytes", "agreement",
                                                   "decision_ms"]))
    print(tables)
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(f"load average (1 min) before {load['before']:.1f}, after {load['after']:.1f} on "
          f"{load['cpus']} CPUs")
    folder = write_results("cnn", {"settings": vars(args), "load_average": load,
                                   "updates": updates, "loop": loops, "export": exports},
                           tables + f"\n\nLoad average (1 min): {load['before']:.1f} before, "
                           f"{load['after']:.1f} after, on {load['cpus']} CPUs.")
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
