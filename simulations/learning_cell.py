"""One cell of the learning benchmark: one device trains one seed on one env for the whole
budget, evaluated greedily as it goes. Its own module so that the cell's fingerprint
hashes this loop (and fedq's product code) but not the benchmark's tables and plots:
editing how results are summarised reuses every finished run."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.harness import PRODUCT_CODE, CellKind
from fedq.simulations.results_io import curve_summary


def run_seed(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Train ``params["seed"]`` on ``params["env"]`` (fedq's defaults plus
    ``params["settings"]``) for ``max-steps`` env steps, greedily evaluated every
    ``eval-every`` steps on ``eval-episodes`` fresh-seeded episodes."""
    import torch

    from fedq.common.config import FedqConfig
    from fedq.common.trainer import LocalTrainer

    torch.set_num_threads(1)  # cells may run side by side, one core each
    config = FedqConfig.from_mapping({"env-id": params["env"], **params["settings"]})
    trainer = LocalTrainer(config, seed=params["seed"])
    curve: list[tuple[int, float]] = []
    try:
        while trainer.counters.env_steps < params["max-steps"]:
            trainer.train(params["eval-every"])
            returns = trainer.evaluate(params["eval-episodes"],
                                       seed=10**6 + trainer.counters.env_steps)
            curve.append((trainer.counters.env_steps, statistics.fmean(returns)))
    finally:
        trainer.close()
    return {**curve_summary(curve, params["goal"]), "backend": config.backend,
            "curve": curve}


LEARNING_RUN = CellKind("learning-run", run_seed,
                        (*PRODUCT_CODE, "fedq.simulations.learning_cell"))
