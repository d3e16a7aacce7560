"""A device's DP-SGD budget planned before a run: the epsilon a noise multiplier will
reach over a run's env steps, and the noise multiplier that reaches a target epsilon.

Why a plan: the per-device epsilon of transition-level DP-SGD depends on the whole
schedule of sample rates (batch / buffer length at every update), and on fedq's defaults
the first updates, on a buffer of a few thousand transitions, cost most of it. A sweep
that picks its noise multipliers by this plan knows, before spending hours of runs,
which cells land at epsilon <= 8; the sweep then reports the epsilon the devices' own
ledgers reached, and a test holds the plan to a real device's ledger.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedq.common.config import FedqConfig
from fedq.common.privacy import Segment, epsilon_of, extend, sample_rate

_BISECTION_STEPS = 40
UTILITY_SHARE = 0.9  # issue 20's target: >= 90 % of the non-private return ...
EPSILON_TARGET = 8.0  # ... at epsilon <= 8 per device


def floats(text: Any) -> list[float]:
    """A comma-separated sweep parameter (``"0.8,1.1"``) as floats."""
    return [float(v) for v in str(text).split(",") if v.strip()]


def planned_history(noise: float, config: FedqConfig, env_steps: int) -> list[Segment]:
    """The accountant history of a device that trains ``env_steps`` steps from an empty
    buffer: one entry per update, as :meth:`LocalTrainer.train` makes them (an update
    after step ``t`` when ``t > learning-starts`` and ``t % train-frequency == 0``, on a
    buffer of ``min(t, buffer-size)`` transitions, ``gradient-steps`` times)."""
    steps = np.arange(1, env_steps + 1)
    updating = (steps > config.learning_starts) & (steps % config.train_frequency == 0)
    lengths = np.repeat(np.minimum(steps[updating], config.buffer_size),
                        config.gradient_steps)
    unique, inverse = np.unique(lengths, return_inverse=True)
    rates = np.array([sample_rate(config.batch_size, int(n)) for n in unique])[inverse]
    return extend([], noise, rates.tolist())


def planned_epsilon(noise: float, config: FedqConfig, env_steps: int) -> float:
    """Epsilon at ``dp-delta`` (RDP accountant) after ``env_steps`` env steps."""
    history = planned_history(noise, config, env_steps)
    return epsilon_of("rdp", config.dp_delta, tuple(history), "numpy")


def noise_for_epsilon(target: float, config: FedqConfig, env_steps: int) -> float:
    """The smallest noise multiplier (to 0.001) whose planned epsilon is <= ``target``."""
    if target <= 0.0:
        raise ValueError(f"target epsilon must be > 0, got {target}")
    low, high = 0.0, 1.0
    while planned_epsilon(high, config, env_steps) > target:
        low, high = high, 2.0 * high
    for _ in range(_BISECTION_STEPS):
        if high - low < 1e-3:
            break
        mid = (low + high) / 2.0
        if planned_epsilon(mid, config, env_steps) > target:
            low = mid
        else:
            high = mid
    return high
