"""Time per DP-SGD update vs a non-private DQN update, for each per-sample-gradient method.

Every variant runs the full update of fedq's default Q-network (CartPole-v1, MLP 64-64,
Double DQN, Huber loss, fused Adam) on one core with one torch thread, reading the same
replay buffer of 49,152 transitions (3 * 2^14, so the DP sample rate is exactly
batch / length and the expected Poisson batch is exactly the batch size):

* non-private: ``DQNLearner.update`` (fixed-size batch, global grad-norm clip);
* fedq: ``PrivateDQNLearner.update`` (closed-form per-sample norms, common/dp_sgd.py);
* Opacus ``GradSampleModule`` in "hooks" and "functorch" mode with ``DPOptimizer``;
* Opacus ghost clipping (``GradSampleModuleFastGradientClipping``, two backward passes);
* ``torch.func`` ``vmap(grad(...))`` per-sample gradients, clipped and noised by hand.

All DP variants Poisson-sample the batch, add noise, and step an Opacus RDP accountant.
Variants alternate in blocks so drift on a shared machine hits them alike; each row is
the median over every timed update. A second table times Opacus's accountants on a
device's lifetime history (what a round's budget check and report cost).

    flock /tmp/fedq-bench.lock python -m fedq.simulations.bench dp_cost   # cells pinned to one core

Cells (:mod:`simulations.harness`): one per batch size (all variants interleaved in it,
so they share the machine's drift) and one for the accountants; they run one at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.func import functional_call, grad, vmap

from fedq.common.config import FedqConfig
from fedq.common.dqn import DQNLearner, PrivateDQNLearner
from fedq.common.privacy import PRV_EPS_ERROR, DevicePrivacy, poisson_indices, sample_rate
from fedq.common.replay_buffer import ReplayBuffer
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

BUFFER_LENGTH = 3 * 2**14
OBS_DIM, N_ACTIONS = 4, 2  # CartPole-v1
Update = Callable[[], object]


def filled_buffer(batch_size: int) -> ReplayBuffer:
    buffer = ReplayBuffer(50_000, OBS_DIM, batch_size, seed=0)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(BUFFER_LENGTH + 1, OBS_DIM)).astype(np.float32)
    for i in range(BUFFER_LENGTH):
        buffer.add(obs[i], int(rng.integers(N_ACTIONS)), 1.0, obs[i + 1], rng.random() < 0.05)
    return buffer


class _PoissonBatches:
    """The sampling, TD target and accounting every DP variant shares with fedq's."""

    def __init__(self, config: FedqConfig, buffer: ReplayBuffer) -> None:
        self.config = config
        self.learner = DQNLearner(OBS_DIM, N_ACTIONS, config)
        self.buffer = buffer
        self.rate = sample_rate(config.batch_size, len(buffer))
        self.rng = np.random.default_rng()
        self.accountant = RDPAccountant()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        obs, actions, rewards, next_obs, terminated = self.buffer.gather(
            poisson_indices(len(self.buffer), self.rate, self.rng))
        return obs, actions, self.learner.td_target(rewards, next_obs, terminated)

    def account(self) -> None:
        self.accountant.step(noise_multiplier=self.config.dp_noise_multiplier,
                             sample_rate=self.rate)


def non_private(config: FedqConfig, buffer: ReplayBuffer) -> Update:
    learner = DQNLearner(OBS_DIM, N_ACTIONS, config)
    learner.bind(buffer)
    return learner.update


def fedq_closed_form(config: FedqConfig, buffer: ReplayBuffer) -> Update:
    learner = PrivateDQNLearner(OBS_DIM, N_ACTIONS, config, DevicePrivacy(config))
    learner.bind(buffer)
    return learner.update


def opacus_grad_sample(mode: str) -> Callable[[FedqConfig, ReplayBuffer], Update]:
    def build(config: FedqConfig, buffer: ReplayBuffer) -> Update:
        shared = _PoissonBatches(config, buffer)
        module = GradSampleModule(shared.learner.online, force_functorch=mode == "functorch")
        optimizer = DPOptimizer(
            shared.learner.optimizer, noise_multiplier=config.dp_noise_multiplier,
            max_grad_norm=config.dp_clip_norm, expected_batch_size=config.batch_size)

        def update() -> float:
            obs, actions, target = shared.batch()
            loss = F.smooth_l1_loss(module(obs).gather(1, actions), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            shared.account()
            return loss.item()
        return update
    return build


def opacus_ghost(config: FedqConfig, buffer: ReplayBuffer) -> Update:
    shared = _PoissonBatches(config, buffer)
    module = GradSampleModuleFastGradientClipping(
        shared.learner.online, max_grad_norm=config.dp_clip_norm, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(
        shared.learner.optimizer, noise_multiplier=config.dp_noise_multiplier,
        max_grad_norm=config.dp_clip_norm, expected_batch_size=config.batch_size)
    criterion = DPLossFastGradientClipping(module, optimizer, nn.SmoothL1Loss())

    def update() -> float:
        obs, actions, target = shared.batch()
        loss = criterion(module(obs).gather(1, actions), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        shared.account()
        return loss.item()
    return update


def torch_func_vmap(config: FedqConfig, buffer: ReplayBuffer) -> Update:
    shared = _PoissonBatches(config, buffer)
    net, optimizer = shared.learner.online, shared.learner.optimizer
    clip, noise = config.dp_clip_norm, config.dp_noise_multiplier
    expected = shared.rate * len(buffer)

    def sample_loss(params: dict[str, torch.Tensor], obs: torch.Tensor, action: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        q = functional_call(net, params, (obs.unsqueeze(0),)).gather(1, action.unsqueeze(0))
        return F.smooth_l1_loss(q, target.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))

    def update() -> None:
        obs, actions, target = shared.batch()
        params = {k: v.detach() for k, v in net.named_parameters()}
        grads = per_sample_grads(params, obs, actions, target)
        norms = torch.cat([g.flatten(1) for g in grads.values()], dim=1).norm(dim=1)
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        for name, p in net.named_parameters():
            summed = torch.tensordot(factors, grads[name], dims=1)
            p.grad = (summed + torch.randn_like(summed) * noise * clip) / expected
        optimizer.step()
        shared.account()
    return update


VARIANTS: dict[str, Callable[[FedqConfig, ReplayBuffer], Update]] = {
    "non-private (DQNLearner)": non_private,
    "fedq closed-form per-sample norms": fedq_closed_form,
    "Opacus hooks": opacus_grad_sample("hooks"),
    "Opacus functorch": opacus_grad_sample("functorch"),
    "Opacus ghost clipping": opacus_ghost,
    "torch.func vmap(grad)": torch_func_vmap,
}
BASELINE = "non-private (DQNLearner)"


def time_updates(batch_size: int, updates: int, block: int) -> dict[str, list[float]]:
    """Seconds per update of every variant, interleaved in blocks of ``block``."""
    config = FedqConfig.from_mapping({"batch-size": batch_size, "dp-enabled": True})
    buffer = filled_buffer(batch_size)
    runs = {name: build(config, buffer) for name, build in VARIANTS.items()}
    for update in runs.values():
        for _ in range(50):  # warm-up: allocator, autograd and vmap caches
            update()
    times: dict[str, list[float]] = {name: [] for name in runs}
    clock = time.perf_counter
    for _ in range(-(-updates // block)):
        for name, update in runs.items():
            for _ in range(block):
                started = clock()
                update()
                times[name].append(clock() - started)
    return times


def lifetime_history(batch_size: int, noise_multiplier: float) -> list[tuple[float, float, int]]:
    """A default device's first 150k updates: the buffer filling 1k -> 50k, then full."""
    privacy = DevicePrivacy(FedqConfig.from_mapping({"batch-size": batch_size}))
    lengths = np.minimum(np.arange(1_001, 151_001), 50_000)
    for rate in privacy.sample_rates(lengths):
        privacy.accountant.step(noise_multiplier=noise_multiplier, sample_rate=rate)
    return privacy.history


def time_accountants(batch_size: int) -> list[dict]:
    history = lifetime_history(batch_size, noise_multiplier=1.0)
    rows = []
    for name, accountant, options in (
            ("rdp", RDPAccountant(), {}),
            ("prv, eps_error 0.01 (Opacus default)", PRVAccountant(), {"eps_error": 0.01}),
            (f"prv, eps_error {PRV_EPS_ERROR} (fedq)", PRVAccountant(),
             {"eps_error": PRV_EPS_ERROR})):
        accountant.history = list(history)
        started = time.perf_counter()
        epsilon = accountant.get_epsilon(delta=1e-5, **options)
        rows.append({"accountant": name, "segments": len(history),
                     "updates": sum(k for _, _, k in history), "epsilon": epsilon,
                     "seconds per get_epsilon": time.perf_counter() - started})
    return rows


def run_updates(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One batch size's cell, on one core: every variant's seconds per update, interleaved."""
    with one_core():
        return {"times": time_updates(params["batch-size"], params["updates"],
                                      params["block"])}


def run_accountants(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    with one_core():
        return {"rows": time_accountants(params["batch-size"])}


_CODE = (*PRODUCT_CODE, "fedq.simulations.bench_dp_cost")
UPDATES = CellKind("dp-cost-updates", run_updates, _CODE)
ACCOUNTANTS = CellKind("dp-cost-accountants", run_accountants, _CODE)


def cells(params: Mapping[str, Any]) -> list[Cell]:
    out = [Cell(UPDATES, {"batch-size": int(b), "updates": params["updates"],
                          "block": params["block"]})
           for b in str(params["batch-sizes"]).split(",")]
    if params["accountants"]:
        out.append(Cell(ACCOUNTANTS, {"batch-size": 64}))
    return out


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    rows, accountant_rows = [], []
    for cell, result in done:
        if cell.kind is ACCOUNTANTS:
            accountant_rows = result["rows"]
            continue
        times = result["times"]
        base = statistics.median(times[BASELINE])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            rows.append({"batch": cell.params["batch-size"], "update": name,
                         "updates timed": len(seconds), "median us": median * 1e6,
                         "p90 us": float(np.percentile(seconds, 90)) * 1e6,
                         "x non-private": median / base})
    text = ""
    if accountant_rows:
        text = ("Opacus accountants on a device's lifetime history (batch 64, noise "
                "multiplier 1, delta 1e-5):\n\n" + markdown_table(
                    accountant_rows, ["accountant", "segments", "updates", "epsilon",
                                      "seconds per get_epsilon"]))

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batches = sorted({r["batch"] for r in rows})
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            mine = [r for r in rows if r["batch"] == batch]
            ax.barh([j + i * width for j in range(len(mine))],
                    [r["x non-private"] for r in mine], height=width, label=f"batch {batch}")
            ax.set_yticks(range(len(mine)), [r["update"] for r in mine], fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("median time per update / non-private update")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Summary(rows, ["batch", "update", "updates timed", "median us", "p90 us",
                          "x non-private"], text,
                   payload={"buffer length": BUFFER_LENGTH, "accountants": accountant_rows},
                   plot=plot)


register_benchmark(Benchmark(
    "dp_cost", "time per DP-SGD update vs a non-private update, per per-sample-gradient "
    "method", defaults={"updates": 2000, "block": 100, "batch-sizes": "64,256",
                        "accountants": True},
    quick={"updates": 20, "block": 10, "batch-sizes": "16", "accountants": False},
    cells=cells, summarise=summarise, parallel=False))
