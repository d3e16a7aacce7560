"""The privacy sweep picks its noise multipliers from a plan of the run's sample rates
(simulations/privacy_plan.py): the plan must be the ledger a real device writes, or the
sweep's "epsilon <= 8" cells would land elsewhere."""

from __future__ import annotations

import pytest

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.privacy_plan import noise_for_epsilon, planned_epsilon, planned_history

# a buffer that fills mid-run, updates every 2nd step, 2 per step: every term of the plan
SMALL = {"hidden-sizes": "16", "backend": "numpy", "learning-starts": 100,
         "batch-size": 16, "buffer-size": 300, "train-frequency": 2, "gradient-steps": 2,
         "dp-enabled": True, "dp-noise-multiplier": 1.3}


def test_plan_is_the_ledger_a_device_writes_over_two_rounds():
    config = FedqConfig.from_mapping(SMALL)
    device = LocalTrainer(config, 0)
    device.train(250)  # two rounds: the ledger continues across train() calls
    device.train(250)
    assert device.privacy.history == planned_history(1.3, config, 500)
    assert planned_epsilon(1.3, config, 500) == pytest.approx(device.privacy.epsilon(),
                                                              rel=1e-9)


def test_noise_for_epsilon_is_the_smallest_noise_within_the_target():
    config = FedqConfig.from_mapping(SMALL)
    noise = noise_for_epsilon(4.0, config, 500)
    assert planned_epsilon(noise, config, 500) <= 4.0
    assert planned_epsilon(noise - 0.002, config, 500) > 4.0


def test_noise_for_epsilon_rejects_a_non_positive_target():
    with pytest.raises(ValueError, match="target epsilon"):
        noise_for_epsilon(0.0, FedqConfig.from_mapping(SMALL), 500)
