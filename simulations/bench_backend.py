"""The numpy device backend against the torch one: train-loop speed, update cost, memory.

All on fedq's default CartPole-v1 config (MLP 64-64, batch 64, one update per env step
after 1,000 steps, Double DQN, Huber, grad-norm clip 10, target sync every 250 steps),
one torch thread, runs alternating in this one process:

* **train loop**: env steps/s of ``LocalTrainer.train`` (acting, env, buffer, updates)
  with ``backend`` torch and numpy, and of a CleanRL-style loop (``dqn.py``'s body at
  the same settings: plain torch, torch forward to act, MSE, no clip, vanilla target);
  median of ``repeats`` runs and the median of the paired ratios;
* **update**: microseconds per ``update()`` call on a filled buffer (median over blocks),
  for both learners and CleanRL's update, and where the numpy update's time goes;
* **device memory**: peak RSS of a fresh process running the ClientApp's train (2,000
  env steps) and evaluate handlers with each backend, and whether torch got imported;
  with ``deployed-rounds`` > 0, peak RSS and PSS of each SuperNode's process tree
  (``flower-supernode``, ``flower-superexec``, ``flwr-clientapp``) in the
  docker-compose federation on loopback (:mod:`simulations.compose_topology`).

    flock /tmp/fedq-bench.lock python -m fedq.simulations.bench backend

Cells (:mod:`simulations.harness`): one per train-loop repeat (the three loops back to
back, so each ratio pairs runs that met the same machine state), one for the update costs,
one per backend for each memory measurement; they run one at a time, the timing ones
pinned to one core.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedq.common.config import FedqConfig
from fedq.common.exploration import linear_epsilon
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
from fedq.simulations.results_io import markdown_table

BACKENDS = ("torch", "numpy")
ROOT = Path(__file__).resolve().parent.parent


# --- train loop ----------------------------------------------------------------------------
def fedq_steps_per_second(backend: str, steps: int, seed: int) -> float:
    trainer = LocalTrainer(FedqConfig.from_mapping({"backend": backend}), seed=seed)
    started = time.perf_counter()
    trainer.train(steps)
    elapsed = time.perf_counter() - started
    trainer.close()
    return steps / elapsed


class CleanRLLoop:
    """CleanRL ``dqn.py``'s training loop at fedq's default settings, minus its vector
    env wrapper and SB3 replay buffer (both slower than what replaces them here)."""

    def __init__(self, seed: int) -> None:
        c = FedqConfig()
        self.c = c
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.env = gym.make(c.env_id)
        self.obs, _ = self.env.reset(seed=seed)
        obs_dim, n_actions = 4, 2
        self.q = self._net(obs_dim, n_actions)
        self.target = self._net(obs_dim, n_actions)
        self.target.load_state_dict(self.q.state_dict())
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=c.learning_rate)
        size = c.buffer_size
        self.b_obs = np.zeros((size, obs_dim), np.float32)
        self.b_next = np.zeros((size, obs_dim), np.float32)
        self.b_actions = np.zeros((size, 1), np.int64)
        self.b_rewards = np.zeros(size, np.float32)
        self.b_dones = np.zeros(size, np.float32)
        self.pos = self.full = 0

    def _net(self, obs_dim: int, n_actions: int) -> nn.Module:
        widths = [obs_dim, *self.c.hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], n_actions))

    def update(self) -> float:
        c = self.c
        idx = self.rng.integers(0, self.full, size=c.batch_size)
        obs, next_obs = torch.tensor(self.b_obs[idx]), torch.tensor(self.b_next[idx])
        actions = torch.tensor(self.b_actions[idx])
        rewards, dones = torch.tensor(self.b_rewards[idx]), torch.tensor(self.b_dones[idx])
        with torch.no_grad():
            target_max, _ = self.target(next_obs).max(dim=1)
            td_target = rewards + c.gamma * target_max * (1 - dones)
        old_val = self.q(obs).gather(1, actions).squeeze()
        loss = F.mse_loss(td_target, old_val)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def run(self, steps: int) -> None:
        c = self.c
        for step in range(steps):
            eps = linear_epsilon(step, c.exploration_initial_eps, c.exploration_final_eps,
                                 c.exploration_steps)
            if random.random() < eps:
                action = self.env.action_space.sample()
            else:
                action = torch.argmax(self.q(torch.Tensor(self.obs))).item()
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            i = self.pos
            self.b_obs[i], self.b_next[i], self.b_actions[i] = self.obs, next_obs, action
            self.b_rewards[i], self.b_dones[i] = reward, terminated
            self.pos = (i + 1) % c.buffer_size
            self.full = min(self.full + 1, c.buffer_size)
            self.obs = self.env.reset()[0] if terminated or truncated else next_obs
            if step > c.learning_starts and step % c.train_frequency == 0:
                self.update()
            if step % c.target_update_interval == 0:
                self.target.load_state_dict(self.q.state_dict())


def cleanrl_steps_per_second(steps: int, seed: int) -> float:
    loop = CleanRLLoop(seed)
    started = time.perf_counter()
    loop.run(steps)
    return steps / (time.perf_counter() - started)


# --- one update ----------------------------------------------------------------------------
def _filled(backend: str) -> LocalTrainer:
    """A trainer whose buffer holds 5,000 transitions and that made no update yet."""
    trainer = LocalTrainer(FedqConfig.from_mapping({"backend": backend,
                                                    "learning-starts": 10**9}), seed=0)
    trainer.train(5_000)
    return trainer


def _per_call_us(call, calls: int, blocks: int = 7) -> float:
    times = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def update_costs(calls: int) -> dict[str, float]:
    costs = {}
    for backend in BACKENDS:
        learner = _filled(backend).learner
        for _ in range(200):  # past Adam's first steps and any lazy set-up
            learner.update()
        costs[f"fedq {backend}"] = _per_call_us(learner.update, calls)
    loop = CleanRLLoop(0)
    loop.run(5_000 - 1)  # learning_starts 1000: it is updating by now
    costs["CleanRL-style torch"] = _per_call_us(loop.update, calls)
    return costs


def numpy_update_phases(calls: int) -> dict[str, float]:
    """Microseconds per phase of the numpy update, the phases run as ``update`` runs them."""
    from fedq.common.numpy_learner import _forward

    learner = _filled("numpy").learner
    learner.update()
    phases = {
        "sample batch": learner.buffer.sample,
        "TD target (2 forwards)": lambda: learner._td_target_into(learner._y),
        "forward": lambda: _forward(learner._layers, learner._obs, learner._outs,
                                    learner._bias_rows),
        "loss + its gradient": lambda: learner._loss_and_output_grad(
            np.subtract(learner._q, learner._y, out=learner._delta)),
        "backward": lambda: learner._backward(learner._obs, learner._outs, learner._douts,
                                              learner._dead),
        "grad-norm clip": lambda: learner._clip_gradient(10.0),
        "Adam": learner._adam_step,
    }
    out = {name: _per_call_us(call, calls) for name, call in phases.items()}
    out["whole update()"] = _per_call_us(learner.update, calls)
    return out


# --- memory of a device process ------------------------------------------------------------
_DEVICE_PROCESS = """
import sys
sys.path.insert(0, "tests")
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from _replies import device_context, instruction
from fedq.client.client_app import app
from fedq.common.config import FedqConfig
from fedq.common.mlp_params import mlp_layout

run_config = {**FedqConfig().to_mapping(), "run-dir": sys.argv[1], "backend": sys.argv[2]}
rng = np.random.default_rng(0)
weights = ArrayRecord({k: Array(rng.normal(0, 0.1, s).astype(np.float32))
                       for k, s in mlp_layout(4, 2, (64, 64)).items()})
context = device_context(0, run_config)
for kind, config in (("train", {"local-steps": 2000}), ("evaluate", {"server-round": 1})):
    reply = app(instruction(0, kind, RecordDict(
        {"arrays": weights, "config": ConfigRecord(config)})), context)
    assert not reply.has_error(), reply.error
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(peak.split()[1], "torch" in sys.modules)
"""


def device_process_memory(backend: str, workdir: Path) -> dict[str, object]:
    """Peak RSS of a fresh Python process that runs one train and one evaluate message
    through the ClientApp in-process (what one ``flwr-clientapp`` process does, without
    Flower's runtime around it)."""
    run_dir = (workdir / f"device-{backend}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", _DEVICE_PROCESS, str(run_dir), backend],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak_kib, torch_loaded = out.stdout.split()[-2:]
    return {"backend": backend, "peak RSS MiB": int(peak_kib) / 1024,
            "torch imported": torch_loaded == "True"}


class TreeMemory(threading.Thread):
    """Peaks of each SuperNode's process tree, sampled every ``period`` s: the summed RSS
    and PSS of the tree (PSS splits pages the processes share, such as Python's and
    Flower's libraries, between them, so it is what the tree adds to a device's memory),
    and the peak RSS of each kind of process in it."""

    def __init__(self, roots: dict[str, int], period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.roots, self.period = roots, period
        self.peak_rss = dict.fromkeys(roots, 0)
        self.peak_pss = dict.fromkeys(roots, 0)
        self.peak_by_kind: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from fedq.simulations.bench_deployment import _children, _kind, _rss_kb, _tree
        from fedq.simulations.bench_scale import memory_kib

        while not self.stop.is_set():
            children = _children()
            for name, root in self.roots.items():
                pids = _tree(root, children)
                rss, pss = memory_kib(pids)
                self.peak_rss[name] = max(self.peak_rss[name], rss)
                self.peak_pss[name] = max(self.peak_pss[name], pss)
                for pid in pids:
                    kind = _kind(pid)
                    self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), _rss_kb(pid))
            time.sleep(self.period)


def deployed_memory(backend: str, rounds: int, local_steps: int,
                    workdir: Path) -> dict[str, object]:
    """Peak memory of the SuperNodes' process trees in the compose federation on loopback
    (the largest of the three devices)."""
    from fedq.simulations.compose_topology import compose_topology

    workdir = (workdir / f"deployed-{backend}").resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    overrides = {"num-server-rounds": rounds, "local-steps": local_steps, "backend": backend}
    with compose_topology(workdir) as topology:
        roots = {name: node.process.pid for name, node in topology.nodes.items()}
        for node in topology.nodes.values():
            node.wait_registered()
        sampler = TreeMemory(roots)
        sampler.start()
        try:
            code = topology.submit(workdir / "run", overrides, log_name="submit.log",
                                   timeout=1800)
        finally:
            sampler.stop.set()
            sampler.join()
    if code != 0:
        raise SystemExit(f"the deployed run failed; see {workdir / 'submit.log'}")
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").open()]
    return {"backend": backend, "rounds": rounds, "local-steps": local_steps,
            "peak tree RSS MiB": max(sampler.peak_rss.values()) / 1024,
            "peak tree PSS MiB": max(sampler.peak_pss.values()) / 1024,
            **{f"peak {k} RSS MiB": sampler.peak_by_kind.get(k, 0) / 1024
               for k in ("flower-supernode", "flower-superexec", "flwr-clientapp")},
            "round-seconds (median)": statistics.median(m["round-seconds"] for m in metrics)}


_CODE = (*PRODUCT_CODE, "fedq.simulations.bench_backend")


def run_loops(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One train-loop repeat, on one core: fedq torch, fedq numpy, CleanRL-style."""
    steps, seed = params["steps"], params["seed"]
    with one_core():
        return {"fedq torch": fedq_steps_per_second("torch", steps, seed),
                "fedq numpy": fedq_steps_per_second("numpy", steps, seed),
                "CleanRL-style": cleanrl_steps_per_second(steps, seed)}


def run_updates(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    with one_core():
        return {"updates": update_costs(params["update-calls"]),
                "phases": numpy_update_phases(params["update-calls"])}


def run_device_memory(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    return device_process_memory(params["backend"], workdir)


def run_deployed(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    return deployed_memory(params["backend"], params["rounds"], params["local-steps"],
                           workdir)


LOOPS = CellKind("backend-loops", run_loops, _CODE)
UPDATES = CellKind("backend-updates", run_updates, _CODE)
DEVICE_MEMORY = CellKind("backend-device-memory", run_device_memory, _CODE)
DEPLOYED = CellKind("backend-deployed", run_deployed, (
    *_CODE, "fedq.simulations.compose_topology", "fedq.simulations.flower_runtime"))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    out = [Cell(LOOPS, {"steps": params["steps"], "seed": rep})
           for rep in range(params["repeats"])]
    out.append(Cell(UPDATES, {"update-calls": params["update-calls"]}))
    out += [Cell(DEVICE_MEMORY, {"backend": b}) for b in BACKENDS]
    if params["deployed-rounds"]:
        out += [Cell(DEPLOYED, {"backend": b, "rounds": params["deployed-rounds"],
                                "local-steps": params["deployed-local-steps"]})
                for b in BACKENDS]
    return out


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    runs: dict[str, list[float]] = {"fedq torch": [], "fedq numpy": [], "CleanRL-style": []}
    update_rows, phase_rows, memory_rows, deployed_rows = [], [], [], []
    for cell, result in done:
        if cell.kind is LOOPS:
            for name in runs:
                runs[name].append(result[name])
        elif cell.kind is UPDATES:
            update_rows = [{"update": name, "us per call": us,
                            "vs CleanRL-style": result["updates"]["CleanRL-style torch"] / us}
                           for name, us in result["updates"].items()]
            phase_rows = [{"numpy update phase": name, "us per call": us}
                          for name, us in result["phases"].items()]
        elif cell.kind is DEVICE_MEMORY:
            memory_rows.append(result)
        else:
            deployed_rows.append(result)
    loop_rows = [{"loop": name, "steps/s (median)": statistics.median(v),
                  "vs CleanRL-style (median of paired)": statistics.median(
                      a / b for a, b in zip(v, runs["CleanRL-style"], strict=True)),
                  "vs fedq torch (median of paired)": statistics.median(
                      a / b for a, b in zip(v, runs["fedq torch"], strict=True))}
                 for name, v in runs.items() if v]
    sections = [
        ("One update on a filled buffer (batch 64)", update_rows),
        ("Where the numpy update's time goes", phase_rows),
        ("Fresh process: ClientApp train (2,000 env steps) + evaluate", memory_rows),
        ("Deployed: compose federation on loopback, per SuperNode", deployed_rows),
    ]
    text = "\n\n".join([f"Train loop: {params['steps']} env steps, {len(runs['fedq torch'])} "
                         "runs each (the table above)."] +
                        [f"{title}\n\n{markdown_table(rows, list(rows[0]))}"
                         for title, rows in sections if rows])

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for i, values in enumerate(runs.values()):
            ax.scatter([i] * len(values), values)
        ax.set_xticks(range(len(runs)), list(runs), fontsize=8)
        ax.set_ylabel("env steps / s, train loop, one core")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Summary(loop_rows, ["loop", "steps/s (median)", "vs CleanRL-style (median of paired)",
                               "vs fedq torch (median of paired)"], text, payload={
        "config": FedqConfig().to_mapping(), "train-loop-runs": runs,
        "update-us": update_rows, "numpy-update-phases-us": phase_rows,
        "device-process-memory": memory_rows, "deployed-memory": deployed_rows},
        plot=plot)


register_benchmark(Benchmark(
    "backend", "the torch-free numpy learner vs the torch learner and a CleanRL-style loop",
    defaults={"steps": 10_000, "repeats": 3, "update-calls": 500, "deployed-rounds": 3,
              "deployed-local-steps": 500},
    quick={"steps": 1_500, "repeats": 1, "update-calls": 20, "deployed-rounds": 0},
    cells=cells, summarise=summarise, parallel=False))
