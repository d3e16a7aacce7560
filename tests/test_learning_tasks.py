"""The learning tasks' settings are valid configs, and no task's learning rate reaches 0
before its budget ends (the default decay over 150k would freeze LunarLander's learner
for the last 350k of its 500k steps)."""

from __future__ import annotations

import pytest

from fedq.common.config import FedqConfig
from fedq.simulations.learning_tasks import TASKS


@pytest.mark.parametrize("env_id", sorted(TASKS))
def test_every_task_is_a_valid_config_whose_lr_decays_no_earlier_than_its_budget(env_id):
    task = TASKS[env_id]
    config = FedqConfig.from_mapping({"env-id": task.env_id, **task.overrides})
    assert config.env_id == env_id
    decay = config.learning_rate_decay_steps
    assert decay == 0 or decay >= task.max_steps or config.learning_rate_final > 0, (
        f"{env_id}: lr reaches 0 at {decay} steps of a {task.max_steps}-step budget")
