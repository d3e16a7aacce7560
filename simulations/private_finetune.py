"""The private fine-tuning cells of :mod:`simulations.privacy_gain` (its docstring says
what they do and which epsilon each reports). Their own module so that the cells' cache
fingerprint hashes this code, not the benchmark's summary and plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedq.common.privacy import epsilon_of
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import CellKind, workdir_of
from fedq.simulations.public_pretrain import (
    EVAL_SEED,
    WEIGHTS,
    greedy_return,
    pretrain_cell,
    run_config,
    sample_physics,
)

_CODE = ("fedq.common", "fedq.simulations.public_pretrain", "fedq.simulations.private_finetune")


def device_physics(index: int) -> dict[str, float]:
    """Virtual device ``index``'s CartPole physics (fixed per index; a stream apart from
    the server's public draws)."""
    return sample_physics(7919, index)


def _pretrained(params: Mapping[str, Any], workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir_of(pretrain_cell(params), workdir) / WEIGHTS) as data:
        return {k: data[k] for k in data.files}


def run_device(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Transition-level: one device fine-tunes the pretrained net on its own physics,
    with DP-SGD when ``noise`` is set (None: the non-private baseline). Also scores the
    pretrained net on the device's physics before it touches device data."""
    physics = json.loads(params["physics"])
    private = params["noise"] is not None
    extra: dict[str, Any] = {
        "env-physics": params["physics"], "seed": params["seed"],
        "learning-rate": params["lr"], "batch-size": params["batch-size"],
        "train-frequency": params["train-frequency"], "learning-starts": params["batch-size"],
        "buffer-size": max(params["steps"], params["batch-size"]),
        "target-update-interval": params["target-update-interval"],
        "exploration-initial-eps": params["explore"], "exploration-final-eps": params["explore"]}
    if private:
        extra |= {"dp-enabled": True, "dp-noise-multiplier": params["noise"],
                  "dp-clip-norm": params["clip"], "dp-delta": params["delta"]}
    trainer = LocalTrainer(run_config(params, **extra), seed=params["seed"])
    trainer.learner.load_online(_pretrained(params, workdir))
    before = greedy_return(trainer, physics, params["eval-episodes"], EVAL_SEED)
    trainer.train(params["steps"])
    epsilon = trainer.privacy.epsilon() if trainer.privacy else math.inf
    return {"return": greedy_return(trainer, physics, params["eval-episodes"], EVAL_SEED),
            "pretrained-return": before, "epsilon": epsilon,
            "updates": trainer.counters.updates}


def run_federation(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Device-level: DP-FedAvg with Poisson device sampling over heterogeneous virtual
    devices, starting from the pretrained net (``noise`` None: the same without clip or
    noise)."""
    n, rate = params["devices"], params["device-rate"]
    rng = np.random.default_rng(params["seed"])
    noise_rng = np.random.default_rng()  # the server's noise: OS entropy
    local = {"seed": params["seed"], "learning-rate": params["lr"],
             "batch-size": params["batch-size"], "train-frequency": params["train-frequency"],
             "learning-starts": params["batch-size"], "buffer-size": params["local-steps"],
             "target-update-interval": params["target-update-interval"],
             "exploration-initial-eps": params["explore"],
             "exploration-final-eps": params["explore"]}
    global_w = {k: v.astype(np.float64) for k, v in _pretrained(params, workdir).items()}
    before = _federation_return(params, global_w)
    curve, participations = [], 0
    for round_ in range(params["rounds"]):
        chosen = np.flatnonzero(rng.random(n) < rate)
        total = {k: np.zeros_like(v) for k, v in global_w.items()}
        for i in chosen:
            config = run_config(params, **local, **{"env-physics": json.dumps(device_physics(i))})
            trainer = LocalTrainer(config, seed=params["seed"] * 1000 + round_ * n + int(i))
            trainer.learner.load_online({k: v.astype(np.float32) for k, v in global_w.items()})
            trainer.train(params["local-steps"])
            delta = {k: v.astype(np.float64) - global_w[k]
                     for k, v in trainer.learner.online_arrays().items()}
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
            scale = (1.0 if params["noise"] is None
                     else min(1.0, params["fed-clip"] / (norm + 1e-12)))
            for k, d in delta.items():
                total[k] += d * scale
            participations += 1
        if params["noise"] is None:  # plain FedAvg of the sampled devices
            denominator = max(len(chosen), 1)
        else:
            denominator = rate * n  # fixed: the sensitivity stays one clip norm
            for v in total.values():
                v += noise_rng.standard_normal(v.shape) * params["noise"] * params["fed-clip"]
        for k in global_w:
            global_w[k] += total[k] / denominator
        curve.append(len(chosen))
    score = _federation_return(params, global_w)
    if params["noise"] is None:
        eps, eps_no_amp = math.inf, math.inf
    else:
        history = ((params["noise"], rate, params["rounds"]),)
        eps = epsilon_of("rdp", params["delta"], history, "numpy")
        eps_no_amp = epsilon_of("rdp", params["delta"], ((params["noise"], 1.0,
                                                           params["rounds"]),), "numpy")
    return {"return": score, "pretrained-return": before, "epsilon": eps,
            "epsilon-no-amplification": eps_no_amp, "sampled-per-round": curve,
            "participations": participations}


def _federation_return(params: Mapping[str, Any], weights: Mapping[str, np.ndarray]
                       ) -> float:
    """Greedy return of ``weights`` over the first ``eval-devices`` virtual devices'
    physics, ``eval-episodes`` episodes in all (spread over the devices)."""
    config = run_config(params, seed=params["seed"])
    trainer = LocalTrainer(config, seed=params["seed"])
    trainer.learner.load_online({k: v.astype(np.float32) for k, v in weights.items()})
    devices = params["eval-devices"]
    per = max(1, params["eval-episodes"] // devices)
    return statistics.fmean(greedy_return(trainer, device_physics(i), per, EVAL_SEED + i)
                            for i in range(devices))


DEVICE = CellKind("privacy-gain-device", run_device, _CODE)
FEDERATION = CellKind("privacy-gain-federation", run_federation, _CODE)
