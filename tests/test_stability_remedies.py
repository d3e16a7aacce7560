"""The learner's stability switches (issue 20): a linear learning-rate decay in env steps
and TD targets clipped to the env's return bounds. Each does what its key says on both
backends (tests/test_numpy_backend.py holds the two backends' updates together); clipping
is on by default wherever the env's reward range is known (``td-target-clip = "auto"``)."""

import dataclasses
import logging

import numpy as np
import pytest

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.replay_buffer import ReplayBuffer
from fedq.common.return_bounds import return_bounds
from fedq.common.trainer import LocalTrainer

QUICK = {"learning-starts": 100, "exploration-steps": 200, "buffer-size": 2000,
         "hidden-sizes": "16"}


def test_return_bounds_follow_from_the_per_step_reward_range():
    assert return_bounds("CartPole-v1", {}, 0.99) == pytest.approx((1.0, 100.0))
    assert return_bounds("CartPole-v1", {"sutton_barto_reward": True}, 0.99) == \
        pytest.approx((-100.0, 0.0))
    assert return_bounds("Acrobot-v1", {}, 0.99) == pytest.approx((-100.0, 0.0))
    assert return_bounds("MountainCar-v0", {}, 0.98) == pytest.approx((-50.0, -1.0))
    assert return_bounds("LunarLander-v3", {}, 0.99) is None


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_clipped_td_targets_stay_within_the_bounds(backend):
    config = FedqConfig.from_mapping({**QUICK, "backend": backend, "td-target-clip": True,
                                      "batch-size": 256})
    trainer = LocalTrainer(config, seed=0)
    buffer = ReplayBuffer(300, 4, 256, seed=1)
    rng = np.random.default_rng(2)
    for _ in range(300):  # rewards far outside CartPole's: unclipped targets leave [1, 100]
        buffer.add(rng.normal(size=4).astype(np.float32), int(rng.integers(2)),
                   float(rng.normal() * 300), rng.normal(size=4).astype(np.float32), False)
    learner = trainer.learner
    learner.bind(buffer)
    buffer.sample()
    if backend == "numpy":
        targets = learner._td_target_into(np.empty(256, np.float32))
    else:
        _, _, rewards, next_obs, terminated = learner._batch
        targets = learner.td_target(rewards, next_obs, terminated).numpy().ravel()
    assert targets.min() == pytest.approx(1.0) and targets.max() == pytest.approx(100.0)
    trainer.close()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_learning_rate_decays_linearly_in_env_steps(backend):
    config = FedqConfig.from_mapping({**QUICK, "backend": backend, "learning-rate": 1e-3,
                                      "learning-rate-final": 1e-4,
                                      "learning-rate-decay-steps": 1000})
    trainer = LocalTrainer(config, seed=0)

    def lr() -> float:
        if backend == "numpy":
            return trainer.learner.learning_rate
        return trainer.learner.optimizer.param_groups[0]["lr"]

    trainer.train(500)  # the last update happened at env step 500
    assert lr() == pytest.approx(1e-3 + (1e-4 - 1e-3) * 0.5)
    trainer.train(1000)
    assert lr() == pytest.approx(1e-4)
    trainer.close()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_learning_rate_follows_the_devices_own_steps_on_the_federation_clock(backend):
    """Issue 20, federated N=4: the last of 4 sequential devices starts each round's epsilon
    schedule at the federation's count (4 x its own steps), but its learning rate must sit
    where a FedAvg device's (or a lone device's) does after as many own steps. On the
    federation clock the 2,000-step decay would already have reached its final rate after
    500 own steps (learning stopped at 37.5k of 150k steps per device before the fix)."""
    config = FedqConfig.from_mapping({
        **QUICK, "backend": backend, "learning-rate": 1e-3, "learning-rate-final": 0.0,
        "learning-rate-decay-steps": 2000, "exploration-steps": 4000,
        "exploration-final-eps": 0.0, "exploration-clock": "federation"})
    visit, devices, local = 3, 4, 250  # 0-based visit of the last device in the chain
    trainer = LocalTrainer(config, seed=0)
    fedavg = LocalTrainer(dataclasses.replace(config, exploration_clock="device"), seed=0)

    def lr(t: LocalTrainer) -> float:
        if backend == "numpy":
            return t.learner.learning_rate
        return t.learner.optimizer.param_groups[0]["lr"]

    for round_index, own_steps in enumerate((250, 500, 750, 1000)):
        start = (devices * round_index + visit) * local  # federation-env-steps it is sent
        stats = trainer.train(local, exploration_start=start)
        fedavg.train(local)
        assert lr(trainer) == pytest.approx(1e-3 * (1 - own_steps / 2000))
        assert lr(trainer) == pytest.approx(lr(fedavg))
        # epsilon stays on the federation's clock: the chain's model has seen 4x the steps
        assert stats.epsilon == pytest.approx(1 - (start + local) / 4000)
    trainer.close()
    fedavg.close()


def test_a_constant_learning_rate_is_never_touched():
    """learning-rate-decay-steps = 0 takes exactly the steps the learner took before the
    schedule existed (the trainer never calls set_learning_rate)."""
    trainer = LocalTrainer(FedqConfig.from_mapping(
        {**QUICK, "backend": "numpy", "learning-rate-decay-steps": 0}), seed=0)
    trainer.learner.set_learning_rate = None  # would raise if the trainer called it
    trainer.train(300)
    assert trainer.learner.learning_rate == 5e-4
    trainer.close()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_auto_clips_exactly_where_the_reward_range_is_known(backend):
    """The default clips CartPole's targets to [1, 100] and leaves an env with no known
    range (LunarLander) unclipped instead of refusing it: users of either get a run."""
    cartpole = LocalTrainer(FedqConfig.from_mapping({**QUICK, "backend": backend}), seed=0)
    assert FedqConfig().td_target_clip == "auto"
    assert cartpole.learner.target_bounds == pytest.approx((1.0, 100.0))
    cartpole.close()
    unclipped = LocalTrainer(FedqConfig.from_mapping(
        {**QUICK, "backend": backend, "td-target-clip": False}), seed=0)
    assert unclipped.learner.target_bounds is None
    unclipped.close()
    lunar = FedqConfig.from_mapping({"env-id": "LunarLander-v3"})
    assert return_bounds(lunar.env_id, lunar.env_kwargs, lunar.gamma) is None


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"'td-target-clip'.*auto"):
        FedqConfig.from_mapping({"td-target-clip": "sometimes"})
    with pytest.raises(ConfigError, match="'td-target-clip'"):
        FedqConfig.from_mapping({"td-target-clip": 1})
    with pytest.raises(ConfigError, match=r"'td-target-clip'.*LunarLander-v3"):
        FedqConfig.from_mapping({"td-target-clip": True, "env-id": "LunarLander-v3"})
    with pytest.raises(ConfigError, match="'learning-rate-final'"):
        FedqConfig.from_mapping({"learning-rate-final": 1e-2, "learning-rate-decay-steps": 10})
    with pytest.raises(ConfigError, match="'learning-rate-decay-steps'"):
        FedqConfig.from_mapping({"learning-rate-decay-steps": -1})


@pytest.mark.parametrize(("overrides", "warned"), [
    ({"num-server-rounds": 40, "local-steps": 5000}, True),  # 200k > the default 150k
    ({"num-server-rounds": 30, "local-steps": 5000}, False),  # exactly the schedule
    ({"num-server-rounds": 40, "local-steps": 5000, "learning-rate-final": 1e-5}, False),
    ({"num-server-rounds": 40, "local-steps": 5000, "learning-rate-decay-steps": 0}, False),
])
def test_a_run_longer_than_the_learning_rate_schedule_is_told_where_learning_ends(
        overrides, warned, caplog):
    """With the default decay to 0 over 150k steps, a longer run learns nothing in its
    last rounds; the ServerApp says so (and in which round) instead of leaving a plateau
    to be read as convergence."""
    from fedq.server.server_app import warn_if_learning_stops

    with caplog.at_level(logging.WARNING):
        warn_if_learning_stops(FedqConfig.from_mapping(overrides))
    assert ("learns nothing after round 30" in caplog.text) is warned
