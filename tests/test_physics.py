"""Physics overrides (common/physics.py): they really change the dynamics, stay on their
own env instance (virtual devices share a process), and bad ones fail naming the field."""

import importlib.util

import numpy as np
import pytest
from gymnasium.envs.classic_control.acrobot import AcrobotEnv

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.envs import make_env
from fedq.common.trainer import LocalTrainer


def _next_state(env, action: int) -> np.ndarray:
    env.reset(seed=0)
    env.unwrapped.state = np.array([0.0, 0.0, 0.05, 0.0])
    for _ in range(5):
        obs, *_ = env.step(action)
    return obs


def test_longer_cartpole_pole_changes_derived_quantities_and_next_state():
    default = make_env("CartPole-v1")
    long_pole = make_env("CartPole-v1", physics={"length": 0.9, "masspole": 0.2})
    base = long_pole.unwrapped
    assert base.polemass_length == pytest.approx(0.2 * 0.9)  # recomputed, not 0.05
    assert base.total_mass == pytest.approx(1.0 + 0.2)
    same_action = 1
    assert not np.allclose(_next_state(default, same_action), _next_state(long_pole, same_action))


def test_acrobot_overrides_stay_on_their_instance():
    heavy = make_env("Acrobot-v1", physics={"link_mass_2": 2.0, "link_length_1": 1.3})
    plain = make_env("Acrobot-v1")
    assert heavy.unwrapped.LINK_MASS_2 == 2.0
    assert plain.unwrapped.LINK_MASS_2 == 1.0 and AcrobotEnv.LINK_MASS_2 == 1.0
    heavy.reset(seed=3)
    plain.reset(seed=3)
    for _ in range(20):
        a, *_ = heavy.step(2)
        b, *_ = plain.step(2)
    assert not np.allclose(a, b)


@pytest.mark.skipif(importlib.util.find_spec("Box2D") is None, reason="needs the box2d extra")
def test_lunar_lander_gravity_and_wind_become_make_kwargs():
    env = make_env("LunarLander-v3", physics={"gravity": -5.0, "enable_wind": True,
                                              "wind_power": 12.0})
    assert env.unwrapped.gravity == -5.0 and env.unwrapped.wind_power == 12.0
    with pytest.raises(ConfigError, match=r"'env-physics.wind_power'.*enable_wind"):
        make_env("LunarLander-v3", physics={"wind_power": 12.0})
    with pytest.raises(ConfigError, match=r"'env-physics.gravity'.*\(-12, 0\]"):
        make_env("LunarLander-v3", physics={"gravity": -20.0})


@pytest.mark.parametrize(("env_id", "physics", "field", "message"), [
    ("CartPole-v1", {"lenght": 0.5}, "env-physics.lenght", "did you mean 'length'"),
    ("CartPole-v1", {"length": -0.5}, "env-physics.length", r"must be in \(0, 10\]"),
    ("CartPole-v1", {"tau": 0.5}, "env-physics.tau", "must be in"),
    ("CartPole-v1", {"gravity": "high"}, "env-physics.gravity", "expected a number"),
    ("Acrobot-v1", {"link_length_2": 2.0}, "env-physics.link_length_2", "does not enter"),
    ("MountainCar-v0", {"gravity": 0.01}, "env-physics", "has no physics overrides"),
])
def test_bad_physics_fails_naming_the_field(env_id, physics, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_env(env_id, physics=physics)
    assert err.value.key == field


def test_trainer_envs_follow_the_env_physics_config_key():
    config = FedqConfig.from_mapping({"env-physics": '{"length": 0.8}', "buffer-size": 100,
                                      "batch-size": 8})
    trainer = LocalTrainer(config, seed=0)
    assert trainer.env.unwrapped.length == 0.8
    trainer.close()
