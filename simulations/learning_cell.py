"""One cell of the learning benchmark: one device trains one seed on one env for the whole
budget, evaluated greedily as it goes. Its own module so that the cell's fingerprint
hashes this loop (and fedq's product code) but not the benchmark's tables and plots:
editing how results are summarised reuses every finished run."""

from __future__ import annotations

import json
import shutil
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
PROGRESS = "progress.json"  # an unfinished cell's curve so far, in its resume_dir


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
    ``eval-every`` steps on ``eval-episodes`` fresh-seeded episodes.

    After every evaluation the trainer (network, optimiser, replay buffer, counters) and
    the curve so far go to :func:`resume_dir`, which the harness does not wipe: a cell
    killed before its budget (LunarLander's 500k take hours on a shared CPU) continues
    from its last evaluation when run again, and its ``resumed-at`` lists where. A
    resumed run starts a fresh episode there, so it is not bit-identical to an
    uninterrupted one."""
    import torch

    from fedq.common.config import FedqConfig
    from fedq.common.trainer import LocalTrainer

    torch.set_num_threads(1)  # cells may run side by side, one core each
    config = FedqConfig.from_mapping({"env-id": params["env"], **params["settings"]})
    trainer = LocalTrainer(config, seed=params["seed"])
    resume = resume_dir(workdir)
    curve: list[tuple[int, float]] = []
    q_curve: list[tuple[int, float]] = []
    resumed_at: list[int] = []
    rng = np.random.default_rng(params["seed"])
    try:
        if trainer.load(resume):
            steps = trainer.counters.env_steps
            # the curve is written before the state: drop points the state never reached
            saved = json.loads((resume / PROGRESS).read_text())
            curve = [(s, v) for s, v in saved["curve"] if s <= steps]
            q_curve = [(s, q) for s, q in saved["max-q"] if s <= steps]
            resumed_at = [*saved["resumed-at"], steps]
        while trainer.counters.env_steps < params["max-steps"]:
            trainer.train(params["eval-every"])
            steps = trainer.counters.env_steps
            returns = trainer.evaluate(params["eval-episodes"], seed=10**6 + steps)
            curve.append((steps, statistics.fmean(returns)))
            q_curve.append((steps, max_abs_q(trainer, rng)))
            resume.mkdir(exist_ok=True)
            atomic_write_text(resume / PROGRESS, json.dumps(
                {"curve": curve, "max-q": q_curve, "resumed-at": resumed_at}))
            trainer.save(resume)
    finally:
        trainer.close()
    shutil.rmtree(resume, ignore_errors=True)  # finished: the harness caches the result
    return {**curve_summary(curve, params["goal"]), "backend": config.backend,
            "curve": curve, "max-q": q_curve, "resumed-at": resumed_at}


def resume_dir(workdir: Path) -> Path:
    """Where an unfinished cell keeps its state: beside its scratch folder, which the
    harness empties whenever the cell starts."""
    return workdir.with_suffix(".resume")


LEARNING_RUN = CellKind("learning-run", run_seed,
                        (*PRODUCT_CODE, "fedq.simulations.learning_cell"))
