"""The cell of :mod:`simulations.privacy_pretrain`: public pretraining, then FedAvg
fine-tuning over devices of their own physics, with or without DP-SGD on each device.

One cell is one seed of one setting, self-contained so that cells run in parallel
workers: it pretrains on the public simulator (:func:`simulations.public_pretrain.
run_pretrain`, deterministic per seed, so every setting of a seed starts from the same
weights; each cell records the pretrained net's return, which shows it), then runs the
federation in-process the way fedq's FedAvg round does it: each device keeps its
:class:`common.trainer.LocalTrainer` (replay buffer, Adam state, counters, privacy
ledger) across rounds, starts each round from the global weights (online and target),
trains ``local-steps`` env steps, and the server averages the online weights (equal
weights: equal steps). After every round the global net is scored greedily on every
device's physics; "solved" is the mean at ``solve-at`` on 3 rounds in a row.

Privacy unit: one transition of a device's replay buffer (DP-SGD, Poisson-sampled
batches, the numpy learner's RDP ledger); each device's epsilon is read from its own
ledger at the end. Pretraining reads no device data, so it costs no epsilon.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import CellKind
from fedq.simulations.public_pretrain import (
    EVAL_SEED,
    WEIGHTS,
    greedy_return,
    run_config,
    run_pretrain,
)

IN_A_ROW = 3  # issue 20's "solved": the goal on 3 evaluations in a row


def device_physics(params: Mapping[str, Any]) -> list[dict[str, float]]:
    """The devices' physics: ``physics`` is a JSON list, one object per device."""
    physics = json.loads(params["physics"])
    if not isinstance(physics, list) or not physics:
        raise ValueError(f"physics: expected a non-empty JSON list, got {params['physics']!r}")
    return physics


def device_config(params: Mapping[str, Any], physics: Mapping[str, float], seed: int):
    """A device's fine-tuning config: constant exploration ``explore`` (the pretrained
    policy acts), learning rate ``lr`` decaying linearly to 0 over the device's whole
    fine-tuning budget (the stable learner's schedule), DP-SGD when ``noise`` is set."""
    budget = params["rounds"] * params["local-steps"]
    extra: dict[str, Any] = {
        "env-physics": json.dumps(dict(physics)), "seed": seed,
        "learning-rate": params["lr"], "learning-rate-decay-steps": budget,
        "batch-size": params["batch-size"], "train-frequency": params["train-frequency"],
        "learning-starts": params["learning-starts"], "buffer-size": params["buffer-size"],
        "target-update-interval": params["target-update-interval"], "tau": params["tau"],
        "exploration-initial-eps": params["explore"],
        "exploration-final-eps": params["explore"]}
    if params["noise"] is not None:
        extra |= {"dp-enabled": True, "dp-noise-multiplier": params["noise"],
                  "dp-clip-norm": params["clip"], "dp-delta": params["delta"]}
    return run_config(params, **extra)


def solved_at(curve: list[tuple[int, float]], goal: float) -> int | None:
    """Env steps per device at the first of ``IN_A_ROW`` evaluations in a row at ``goal``."""
    run = 0
    for i, (_, score) in enumerate(curve):
        run = run + 1 if score >= goal else 0
        if run == IN_A_ROW:
            return curve[i - IN_A_ROW + 1][0]
    return None


def federated_finetune(params: Mapping[str, Any], weights: Mapping[str, np.ndarray]
                       ) -> dict[str, Any]:
    """FedAvg fine-tuning of ``weights`` over the devices of ``physics``; the curve of the
    global net's greedy return (mean over devices), final, best, solved, epsilons."""
    physics = device_physics(params)
    seed = params["seed"]
    trainers = [LocalTrainer(device_config(params, p, seed * 100 + i), seed=seed * 100 + i)
                for i, p in enumerate(physics)]
    global_w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}

    federated = params["federated"]
    for trainer in trainers:
        trainer.learner.load_online(global_w)

    def score() -> list[float]:
        if federated:
            trainers[0].learner.load_online(global_w)
        return [greedy_return(trainers[0] if federated else t, p, params["eval-episodes"],
                              EVAL_SEED + i)
                for i, (t, p) in enumerate(zip(trainers, physics, strict=True))]

    before = score()
    curve: list[tuple[int, float]] = []
    per_device: list[list[float]] = []
    for _ in range(params["rounds"]):
        replies = []
        for trainer in trainers:
            if federated:
                trainer.learner.load_online(global_w)  # online and target := global
            trainer.train(params["local-steps"])
            replies.append({k: v.copy() for k, v in trainer.learner.online_arrays().items()})
        if federated:
            global_w = {k: np.mean([r[k] for r in replies], axis=0, dtype=np.float64
                                   ).astype(np.float32) for k in global_w}
        returns = score()
        per_device.append(returns)
        curve.append((trainers[0].counters.env_steps, statistics.fmean(returns)))
    epsilons = [t.privacy.epsilon() if t.privacy else math.inf for t in trainers]
    return {"pretrained-return": statistics.fmean(before), "pretrained-per-device": before,
            "curve": curve, "per-device": per_device, "final-return": curve[-1][1],
            "best-return": max(s for _, s in curve),
            "solved-at": solved_at(curve, params["solve-at"]), "epsilons": epsilons,
            "updates": [t.counters.updates for t in trainers]}


def pretrain(params: Mapping[str, Any], workdir: Path
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Pretrain (public, this seed) into ``workdir``: the pretraining's record and the
    weights it kept. It selects them on ``pretrain-eval-episodes`` greedy episodes spread
    over its selection physics (free: public simulator), more than each fine-tuning round
    spends on the devices."""
    pretraining = run_pretrain({**params, "eval-episodes": params["pretrain-eval-episodes"]},
                               workdir)
    with np.load(workdir / WEIGHTS) as data:
        return pretraining, {k: data[k] for k in data.files}


def run_cell(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Pretrain, then fine-tune federated."""
    pretraining, weights = pretrain(params, workdir)
    return {"pretraining": pretraining, **federated_finetune(params, weights)}


FINETUNE = CellKind("privacy-pretrain-finetune", run_cell,
                    ("fedq.common", "fedq.simulations.public_pretrain",
                     "fedq.simulations.pretrain_finetune"))
