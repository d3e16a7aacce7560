"""One cell of the learning benchmark: one device trains one seed on one env for the whole
budget, evaluated greedily as it goes. Its own module so that the cell's fingerprint
hashes this loop (and fedq's product code) but not the benchmark's tables and plots:
editing how results are summarised reuses every finished run."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedq.common.atomic import atomic_write_text
from fedq.simulations.harness import PRODUCT_CODE, CellKind
from fedq.simulations.results_io import curve_summary

if TYPE_CHECKING:
    from fedq.common.trainer import LocalTrainer

Q_SAMPLE = 2048  # replay states the max |Q| is taken over (as sweep_stability's)


def max_abs_q(trainer: LocalTrainer, rng: np.random.Generator) -> float:
    """The largest |Q(s, a)| of the online MLP over a sample of replay states: whether
    Q-values run away (issue 20), from ``online_arrays`` so either backend answers."""
    n = len(trainer.buffer)
    if n == 0:
        return 0.0
    h = trainer.buffer.obs[rng.choice(n, size=min(n, Q_SAMPLE), replace=False)]
    arrays = list(trainer.learner.online_arrays().values())  # weight, bias per layer
    for i in range(0, len(arrays), 2):
        h = h @ arrays[i].T + arrays[i + 1]
        if i + 2 < len(arrays):
            h = np.maximum(h, 0.0)
    return float(np.abs(h).max())


def run_seed(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Train ``params["seed"]`` on ``params["env"]`` (fedq's defaults plus
    ``params["settings"]``) for ``max-steps`` env steps, greedily evaluated every
    ``eval-every`` steps on ``eval-episodes`` fresh-seeded episodes. The curve so far
    (and max |Q|) is rewritten to ``workdir/progress.json`` after every evaluation, so
    a long cell stopped before its budget still shows how far it got."""
    import torch

    from fedq.common.config import FedqConfig
    from fedq.common.trainer import LocalTrainer

    torch.set_num_threads(1)  # cells may run side by side, one core each
    config = FedqConfig.from_mapping({"env-id": params["env"], **params["settings"]})
    trainer = LocalTrainer(config, seed=params["seed"])
    curve: list[tuple[int, float]] = []
    q_curve: list[tuple[int, float]] = []
    rng = np.random.default_rng(params["seed"])
    try:
        while trainer.counters.env_steps < params["max-steps"]:
            trainer.train(params["eval-every"])
            steps = trainer.counters.env_steps
            returns = trainer.evaluate(params["eval-episodes"], seed=10**6 + steps)
            curve.append((steps, statistics.fmean(returns)))
            q_curve.append((steps, max_abs_q(trainer, rng)))
            atomic_write_text(workdir / "progress.json",
                              json.dumps({"curve": curve, "max-q": q_curve}))
    finally:
        trainer.close()
    return {**curve_summary(curve, params["goal"]), "backend": config.backend,
            "curve": curve, "max-q": q_curve}


LEARNING_RUN = CellKind("learning-run", run_seed,
                        (*PRODUCT_CODE, "fedq.simulations.learning_cell"))
