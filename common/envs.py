"""Environment factory: gymnasium id + make kwargs, checked for what the DQN needs.

The learner drives one plain (non-vector) gymnasium env, so there is no autoreset to
get wrong: the final observation of an episode, whether it ended by ``terminated`` or
by ``truncated``, is the one ``step`` returned, and the learner resets explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from fedq.common.config import ConfigError
from fedq.common.physics import apply_physics, physics_make_kwargs


@dataclass(frozen=True)
class EnvSpec:
    """What the Q-network needs to know about an environment."""

    obs_dim: int
    n_actions: int


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None,
             physics: dict[str, Any] | None = None) -> gym.Env:
    """Create the env with its physics overrides (:mod:`common.physics`), turning
    gymnasium's errors into errors that name the config key."""
    physics = physics or {}
    kwargs = {**(env_kwargs or {}), **physics_make_kwargs(env_id, physics, env_kwargs or {})}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as err:  # unknown id, missing dependency, bad version
        known = sorted(k for k in gym.registry if "/" not in k)
        raise ConfigError("env-id", f"cannot make {env_id!r}: {err}. Known ids include "
                          f"{', '.join(known[:12])}, ...") from None
    except TypeError as err:  # unexpected keyword argument
        raise ConfigError("env-kwargs", f"{env_id!r} rejected {env_kwargs}: {err}") from None
    apply_physics(env_id, env, physics)
    check_spaces(env_id, env)
    if len(env.observation_space.shape) != 1:  # the MLP and the replay buffer take flat rows
        env = gym.wrappers.FlattenObservation(env)
    return env


def check_spaces(env_id: str, env: gym.Env) -> EnvSpec:
    """Refuse envs a DQN with an MLP cannot drive: non-Box observations, non-Discrete actions."""
    obs_space, act_space = env.observation_space, env.action_space
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError("env-id", f"{env_id!r} has action space {act_space}; "
                          "DQN needs a Discrete action space")
    if act_space.start != 0:
        raise ConfigError("env-id", f"{env_id!r} has action space {act_space} starting at "
                          f"{act_space.start}; fedq's Q-network indexes actions from 0")
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError("env-id", f"{env_id!r} has observation space {obs_space}; "
                          "fedq needs a Box observation space")
    return EnvSpec(obs_dim=int(np.prod(obs_space.shape)), n_actions=int(act_space.n))


def env_spec(env_id: str, env_kwargs: dict[str, Any] | None = None,
             physics: dict[str, Any] | None = None) -> EnvSpec:
    """Make the env once to read its spaces (also the config-time check of env-id,
    env-kwargs and env-physics)."""
    env = make_env(env_id, env_kwargs, physics)
    try:
        return check_spaces(env_id, env)
    finally:
        env.close()
