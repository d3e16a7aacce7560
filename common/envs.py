"""Environment factory: gymnasium id + make kwargs, checked for what the DQN needs.

Image observations (uint8 frames, e.g. ``CarRacing-v3``'s (96, 96, 3)) go through
gymnasium's own wrappers as the run configures them (:class:`ImageObs`: ``obs-grayscale``,
``obs-resize``, ``obs-frame-stack``) and keep their shape and dtype; other observations
with more than one dimension are flattened into the row the MLP reads.

The learner drives one plain (non-vector) gymnasium env, so there is no autoreset to
get wrong: the final observation of an episode, whether it ended by ``terminated`` or
by ``truncated``, is the one ``step`` returned, and the learner resets explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from fedq.common.action_repeat import repeat_actions
from fedq.common.config import ConfigError
from fedq.common.frame_buffer import check_buffer_memory
from fedq.common.network_registry import (
    IMAGE,
    NETWORK_REGISTRY,
    network_spec,
    observation_kind,
)
from fedq.common.physics import apply_physics, physics_make_kwargs

if TYPE_CHECKING:
    from fedq.common.config import FedqConfig


@dataclass(frozen=True)
class ImageObs:
    """How image observations are preprocessed, by gymnasium's wrappers in this order:
    ``GrayscaleObservation`` (``grayscale``), ``ResizeObservation`` to ``resize`` x
    ``resize`` (0: keep the size), ``FrameStackObservation`` of ``frame_stack`` frames
    (1: none). Envs whose observations are not images ignore it."""

    grayscale: bool = False
    resize: int = 0
    frame_stack: int = 1

    @classmethod
    def of(cls, config: FedqConfig) -> ImageObs:
        return cls(config.obs_grayscale, config.obs_resize, config.obs_frame_stack)


@dataclass(frozen=True)
class EnvSpec:
    """What the Q-network needs to know about an environment."""

    obs_dim: int
    n_actions: int
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    observation_space: gym.spaces.Box

    @property
    def obs_kind(self) -> str:
        return observation_kind(self.obs_shape, self.obs_dtype)


def make_env(env_id: str, env_kwargs: dict[str, Any] | None = None,
             physics: dict[str, Any] | None = None, image: ImageObs | None = None,
             action_repeat: int = 1) -> gym.Env:
    """Create the env with its physics overrides (:mod:`common.physics`), action repeat
    and image preprocessing, turning gymnasium's errors into errors that name the config
    key. ``action_repeat`` > 1 repeats each action (:mod:`common.action_repeat`) inside
    the image wrappers, so the skipped frames are never grayscaled, resized or stacked."""
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
    env = repeat_actions(env, action_repeat)
    space = env.observation_space
    if observation_kind(space.shape, space.dtype) == IMAGE:
        return wrap_image(env, image or ImageObs())
    if len(space.shape) != 1:  # the MLP reads flat rows
        env = gym.wrappers.FlattenObservation(env)
    return env


def wrap_image(env: gym.Env, image: ImageObs) -> gym.Env:
    """Gymnasium's grayscale, resize and frame-stack wrappers, as ``image`` asks."""
    if image.grayscale and len(env.observation_space.shape) == 3:
        env = gym.wrappers.GrayscaleObservation(env, keep_dim=False)
    if image.resize:
        try:
            env = gym.wrappers.ResizeObservation(env, (image.resize, image.resize))
        except gym.error.DependencyNotInstalled as err:
            raise ConfigError("obs-resize", f"needs opencv: pip install 'fedq[pixels]' "
                              f"({err})") from None
    if image.frame_stack > 1:
        env = gym.wrappers.FrameStackObservation(env, image.frame_stack)
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
    return EnvSpec(obs_dim=int(np.prod(obs_space.shape)), n_actions=int(act_space.n),
                   obs_shape=tuple(int(d) for d in obs_space.shape),
                   obs_dtype=np.dtype(obs_space.dtype), observation_space=obs_space)


def env_spec(env_id: str, env_kwargs: dict[str, Any] | None = None,
             physics: dict[str, Any] | None = None, image: ImageObs | None = None) -> EnvSpec:
    """Make the env once to read its spaces (also the config-time check of env-id,
    env-kwargs and env-physics)."""
    env = make_env(env_id, env_kwargs, physics, image)
    try:
        return check_spaces(env_id, env)
    finally:
        env.close()


def run_env_spec(config: FedqConfig) -> EnvSpec:
    """The spec of the run's env as its devices see it (image preprocessing included),
    checked against the run's Q-network and replay-buffer memory limit: the check every
    entry point runs before any process starts (``fedq-simulate``, ``fedq-client``, the
    ServerApp)."""
    spec = env_spec(config.env_id, config.env_kwargs, config.env_physics,
                    ImageObs.of(config))
    check_network_fits(config, spec)
    check_buffer_memory(config, spec)
    return spec


def check_network_fits(config: FedqConfig, spec: EnvSpec) -> None:
    """Refuse a network that cannot read the env's observations (an MLP on camera frames,
    a CNN on a vector), naming the ``network`` field."""
    network = network_spec(config.network)
    if spec.obs_kind in network.observations:
        return
    fitting = [s.name for s in NETWORK_REGISTRY.values() if spec.obs_kind in s.observations]
    raise ConfigError("network", f"{config.network!r} reads {' or '.join(network.observations)} "
                      f"observations, but {config.env_id!r} observes {spec.obs_kind}s of shape "
                      f"{spec.obs_shape} ({spec.obs_dtype}); use one of {', '.join(fitting)}")
