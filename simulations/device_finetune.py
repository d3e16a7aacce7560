"""The cell of :mod:`simulations.privacy_pretrain_device`: the same public pretraining as
:mod:`simulations.privacy_pretrain`, then DP-FedAvg (McMahan et al. 2018) fine-tuning
over many virtual devices, with the device as the privacy unit.

One cell is one seed of one setting. It pretrains on the public simulator exactly as a
privacy_pretrain cell of the same seed does (deterministic per seed, so the pretrained
net and the "pretrained only" return are the same), then, each round:

- samples every one of ``devices`` virtual devices independently with probability
  ``device-rate`` (Poisson sampling, seeded generator);
- each sampled device starts a fresh :class:`common.trainer.LocalTrainer` on its own
  physics (:func:`population_physics`) from the global weights (online and target),
  trains ``local-steps`` env steps (no local DP) and returns ``w_i - w_global``;
- private (``noise`` set): each update is clipped to L2 norm ``fed-clip``, the server adds
  N(0, (noise x fed-clip)^2) to the sum and divides by the *expected* number of sampled
  devices ``devices x device-rate`` (fixed, so one device changes the sum by at most one
  clip norm); non-private (``noise`` None): the plain mean of the sampled devices'
  unclipped updates.

After every round the global net is scored greedily on privacy_pretrain's 4 device
physics with the same episodes (``eval-episodes`` each, the same evaluation seeds), so
both privacy units share the y axis. Epsilon: the subsampled Gaussian's RDP at rate
``device-rate`` for ``rounds`` steps (amplification by sampling, valid only if the
sample stays secret from the adversary), and the bound without amplification (rate 1).
"""

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
from fedq.simulations.harness import CellKind
from fedq.simulations.pretrain_finetune import device_physics, pretrain, solved_at
from fedq.simulations.public_pretrain import (
    EVAL_SEED,
    greedy_return,
    run_config,
)

POPULATION_STREAM = 7927  # the population's physics draws: fixed across seeds
SPREAD = 0.1  # each drawn parameter is its anchor's times U(1 - SPREAD, 1 + SPREAD)
_BISECTION_STEPS = 40


def population_physics(params: Mapping[str, Any]) -> list[dict[str, float]]:
    """The ``devices`` virtual devices' physics: device ``i`` is anchored on
    privacy_pretrain's device ``i % 4``; devices 0-3 are those 4 exactly, every other
    device scales each of its anchor's parameters by its own U(0.9, 1.1) draw. So the
    population is privacy_pretrain's physics family with spread around each member."""
    anchors = device_physics(params)
    out = []
    for i in range(params["devices"]):
        anchor = anchors[i % len(anchors)]
        if i < len(anchors):
            out.append(dict(anchor))
            continue
        rng = np.random.default_rng([POPULATION_STREAM, i])
        out.append({k: round(float(v * rng.uniform(1 - SPREAD, 1 + SPREAD)), 3)
                    for k, v in anchor.items()})
    return out


def federation_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    """Device-level epsilon of ``rounds`` subsampled-Gaussian rounds at ``rate`` (RDP)."""
    return epsilon_of("rdp", delta, ((noise, rate, rounds),), "numpy")


def noise_for_federation(target: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest server noise multiplier (to 0.001) whose epsilon with amplification
    by sampling at ``rate`` over ``rounds`` rounds is <= ``target``: chosen before any run."""
    if target <= 0.0:
        raise ValueError(f"epsilons: a target epsilon must be > 0, got {target}")
    low, high = 0.0, 1.0
    while federation_epsilon(high, rate, rounds, delta) > target:
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        if high - low < 1e-3:
            break
        mid = (low + high) / 2.0
        if federation_epsilon(mid, rate, rounds, delta) > target:
            low = mid
        else:
            high = mid
    return high


def _local_config(params: Mapping[str, Any], physics: Mapping[str, float], seed: int,
                  lr: float):
    """A sampled device's round: fresh buffer and optimiser (a virtual device keeps no
    state between rounds), constant exploration ``explore``, constant ``lr``."""
    return run_config(params, **{
        "env-physics": json.dumps(dict(physics)), "seed": seed, "learning-rate": lr,
        "batch-size": params["batch-size"], "train-frequency": params["train-frequency"],
        "learning-starts": params["learning-starts"],
        "buffer-size": max(params["local-steps"], params["batch-size"]),
        "target-update-interval": params["target-update-interval"], "tau": params["tau"],
        "exploration-initial-eps": params["explore"],
        "exploration-final-eps": params["explore"]})


def dp_fedavg(params: Mapping[str, Any], weights: Mapping[str, np.ndarray]
              ) -> dict[str, Any]:
    """(DP-)FedAvg fine-tuning of ``weights``; the global net's greedy return on the 4
    evaluation physics after every round, final, best, solved, epsilons, update norms."""
    n, rate, seed = params["devices"], params["device-rate"], params["seed"]
    population = population_physics(params)
    evaluation = device_physics(params)
    sampler = np.random.default_rng([seed, 1])
    server_noise = np.random.default_rng([seed, 2])  # seeded: a reproducible simulation
    scorer = LocalTrainer(run_config(params, seed=seed), seed=seed)
    global_w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}

    def score() -> list[float]:
        scorer.learner.load_online({k: v.astype(np.float32) for k, v in global_w.items()})
        return [greedy_return(scorer, p, params["eval-episodes"], EVAL_SEED + i)
                for i, p in enumerate(evaluation)]

    before = score()
    curve: list[tuple[int, float]] = []
    sampled, norms, env_steps = [], [], 0
    for round_ in range(params["rounds"]):
        lr = params["lr"] * (1.0 - round_ / params["rounds"])  # linear decay to 0
        chosen = np.flatnonzero(sampler.random(n) < rate)
        total = {k: np.zeros_like(v) for k, v in global_w.items()}
        round_norms = []
        for i in chosen:
            device_seed = seed * 1_000_000 + round_ * n + int(i)
            trainer = LocalTrainer(_local_config(params, population[i], device_seed, lr),
                                   seed=device_seed)
            trainer.learner.load_online({k: v.astype(np.float32)
                                         for k, v in global_w.items()})
            trainer.train(params["local-steps"])
            env_steps += params["local-steps"]
            delta = {k: v.astype(np.float64) - global_w[k]
                     for k, v in trainer.learner.online_arrays().items()}
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
            round_norms.append(norm)
            scale = (1.0 if params["noise"] is None
                     else min(1.0, params["fed-clip"] / (norm + 1e-12)))
            for k, d in delta.items():
                total[k] += d * scale
        if params["noise"] is None:
            denominator = max(len(chosen), 1)
        else:
            denominator = rate * n
            for v in total.values():
                v += server_noise.standard_normal(v.shape) * params["noise"] * params["fed-clip"]
        for k in global_w:
            global_w[k] += total[k] / denominator
        sampled.append(len(chosen))
        norms.append(statistics.median(round_norms) if round_norms else None)
        curve.append((env_steps, statistics.fmean(score())))
    if params["noise"] is None:
        eps = eps_no_amp = math.inf
    else:
        eps = federation_epsilon(params["noise"], rate, params["rounds"], params["delta"])
        eps_no_amp = federation_epsilon(params["noise"], 1.0, params["rounds"],
                                        params["delta"])
    return {"pretrained-return": statistics.fmean(before), "pretrained-per-device": before,
            "curve": curve, "final-return": curve[-1][1],
            "best-return": max(s for _, s in curve),
            "solved-at": solved_at(curve, params["solve-at"]), "epsilons": [eps],
            "epsilon-no-amplification": eps_no_amp, "sampled-per-round": sampled,
            "median-update-norm-per-round": norms}


def run_cell(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Pretrain (public, this seed, as privacy_pretrain does) into ``workdir``, then
    (DP-)FedAvg over the virtual devices."""
    pretraining, weights = pretrain(params, workdir)
    return {"pretraining": pretraining, **dp_fedavg(params, weights)}


DP_FEDAVG = CellKind("privacy-pretrain-dp-fedavg", run_cell,
                     ("fedq.common", "fedq.simulations.public_pretrain",
                      "fedq.simulations.pretrain_finetune",
                      "fedq.simulations.device_finetune"))
