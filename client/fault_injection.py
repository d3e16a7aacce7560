"""BENCHMARK FAULT INJECTOR: make chosen simulated devices send bad updates.

Exists only so ``simulations/bench_robustness.py`` and the tests can show what update
validation and robust aggregation hold off; a real deployment leaves ``attack`` at
``none``. A device whose simulation ``partition-id`` is in ``attack-partitions`` trains
as usual (its own state stays honest) but replaces the weights it *sends*:

- ``nan``: every weight NaN, like a learner that diverged;
- ``noise``: the global weights plus Gaussian noise of std ``attack-scale`` per weight,
  a large-norm random update (a faulty or malicious device).

Real devices (no partition id) never attack, whatever the config says.
"""

from __future__ import annotations

import numpy as np

from common.config import FedqConfig


def inject_fault(local: dict[str, np.ndarray], global_weights: dict[str, np.ndarray],
                 config: FedqConfig, partition_id: int | None,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The weights this device sends: ``local`` unless it is a configured attacker."""
    if config.attack == "none" or partition_id is None \
            or partition_id not in config.attack_partitions:
        return local
    if config.attack == "nan":
        return {k: np.full_like(v, np.nan) for k, v in local.items()}
    return {k: (g + rng.normal(0.0, config.attack_scale, g.shape)).astype(np.float32)
            for k, g in global_weights.items()}
