"""Public pretraining for :mod:`simulations.privacy_gain`: DQN on the default-physics env.

The default-physics simulator holds no device data, so the server may train on it at no
privacy cost. Its own module so that the pretraining cells' cache fingerprint hashes only
this code (changing the fine-tuning experiments does not retrain the public model).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedq.common.config import FedqConfig
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.simulations.harness import Cell, CellKind

WEIGHTS = "pretrained.npz"
EVAL_SEED = 10**6  # greedy evaluation episodes start here (never a training seed)
PUBLIC_PHYSICS_BASE = 104729  # the server's own draws, a stream apart from the devices'


def sample_physics(base: int, index: int) -> dict[str, float]:
    """CartPole physics number ``index`` of the stream ``base``: pole half-length, cart
    mass and push force drawn around gymnasium's defaults (0.5, 1.0, 10.0). The ranges are
    public (what a vendor knows of its devices); each device's draw is its own."""
    rng = np.random.default_rng(base + index)
    return {"length": round(float(rng.uniform(0.3, 0.9)), 3),
            "masscart": round(float(rng.uniform(0.5, 2.0)), 3),
            "force_mag": round(float(rng.uniform(7.0, 13.0)), 3)}


def run_config(params: Mapping[str, Any], **extra: Any) -> FedqConfig:
    """numpy-backend config shared by every cell; ``extra``: kebab-case overrides."""
    base = {"env-id": params["env-id"], "backend": "numpy",
            "hidden-sizes": params["hidden-sizes"]}
    return FedqConfig.from_mapping({**base, **{k.replace("_", "-"): v
                                               for k, v in extra.items()}})


def greedy_return(trainer: LocalTrainer, physics: Mapping[str, float], episodes: int,
                  seed: int) -> float:
    """Mean greedy return of the trainer's online network on ``physics``."""
    c = trainer.config
    return statistics.fmean(play_episodes(
        trainer.learner.policy.act, c.env_id, episodes, seed=seed,
        env_physics=dict(physics)))


# --- cells ------------------------------------------------------------------------------
def run_pretrain(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Public pretraining on default physics; keeps the weights that scored best in greedy
    evaluation on the default physics and ``pretrain-physics`` public physics draws
    (:func:`sample_physics`, never a device's), stopping once that mean is at ``goal``.
    Selecting on several physics is free (simulated, no device data) and picks a policy
    that does not only balance the default pole."""
    config = run_config(params, **{"learning-rate": params["pretrain-lr"],
                                   "seed": params["seed"]})
    trainer = LocalTrainer(config, seed=params["seed"])
    curve, best, best_weights = [], -math.inf, None
    selection = [{}] + [sample_physics(PUBLIC_PHYSICS_BASE, j)
                        for j in range(params["pretrain-physics"])]
    per, rest = divmod(params["eval-episodes"], len(selection))
    if per < 1 or rest:  # a silent 1-episode selection once spoilt a whole sweep
        raise ValueError(f"eval-episodes = {params['eval-episodes']} must be a positive "
                         f"multiple of the {len(selection)} selection physics (the default "
                         "and pretrain-physics public draws): each gets an equal share")
    for _ in range(params["pretrain-steps"] // params["pretrain-eval-every"]):
        trainer.train(params["pretrain-eval-every"])
        score = statistics.fmean(
            greedy_return(trainer, physics, per, EVAL_SEED + 7) for physics in selection)
        curve.append([trainer.counters.env_steps, score])
        if score > best:
            best = score
            best_weights = {k: v.copy() for k, v in trainer.learner.online_arrays().items()}
        if score >= params["goal"]:
            break
    assert best_weights is not None
    np.savez(workdir / WEIGHTS, **best_weights)
    return {"curve": curve, "best-return": best, "env-steps": trainer.counters.env_steps}


PRETRAIN = CellKind("privacy-gain-pretrain", run_pretrain,
                    ("fedq.common", "fedq.simulations.public_pretrain"))

SHARED_PARAMS = ("env-id", "hidden-sizes", "eval-episodes", "pretrain-steps", "pretrain-lr",
           "pretrain-eval-every", "pretrain-physics", "goal")


def pretrain_cell(params: Mapping[str, Any]) -> Cell:
    return Cell(PRETRAIN, {**{k: params[k] for k in SHARED_PARAMS}, "seed": params["seed"]})
