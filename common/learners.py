"""Which DQN learner a device runs (config ``backend``), imported only when chosen.

``torch`` (:mod:`common.dqn`) and ``numpy`` (:mod:`common.numpy_learner`) learners offer
the same interface (:class:`Learner`), so the trainer and the ClientApp never name a
backend. The torch modules are imported here, inside :func:`make_learner`, and nowhere on
the numpy path: a numpy device's process never loads torch or Opacus (a test checks
``sys.modules``), and a device installed without them runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.dp_mechanism_registry import dp_backend
from fedq.common.mlp_forward import MlpForward
from fedq.common.privacy import DevicePrivacy
from fedq.common.replay_buffer import ReplayBuffer

if TYPE_CHECKING:
    import gymnasium as gym

STATE_FILES = {"torch": "learner.pt", "numpy": "learner.npz"}
"""The learner state file each backend writes into a device's state generation (the
learners import it from here; this module imports them only inside make_learner)."""


class Learner(Protocol):
    """What the trainer and the ClientApp use of a learner."""

    backend: str
    policy: MlpForward  # or common.networks.TorchPolicy: anything with act(obs) -> int

    @property
    def layout(self) -> dict[str, tuple[int, ...]]: ...
    def bind(self, buffer: ReplayBuffer) -> None: ...
    def update(self) -> float: ...
    def sync_target(self) -> None: ...
    def set_proximal(self, mu: float) -> None: ...
    def set_learning_rate(self, lr: float) -> None: ...
    def load_online(self, state: Mapping[str, np.ndarray],
                    sync_target: bool = True) -> None: ...
    def online_arrays(self) -> dict[str, np.ndarray]: ...
    def save(self, directory: Path, extra: dict) -> None: ...
    def load(self, directory: Path) -> dict: ...


def make_learner(observation_space: gym.spaces.Box | int, n_actions: int, config: FedqConfig,
                 privacy: DevicePrivacy | None, seed: int) -> Learner:
    """The configured backend's learner of the configured network
    (:func:`common.network_registry.build_network`); when ``privacy`` is given, the learner
    of the configured ``dp-mechanism`` on that backend (common/dp_mechanism_registry.py)."""
    if config.backend != "numpy":
        import torch

        torch.manual_seed(seed)
    if privacy is not None:
        build = dp_backend(config.dp_mechanism, config.backend).build
        return build(observation_space, n_actions, config, privacy, seed)
    if config.backend == "numpy":
        from fedq.common.numpy_learner import NumpyDQNLearner

        return NumpyDQNLearner(observation_space, n_actions, config, seed)
    from fedq.common.dqn import DQNLearner

    return DQNLearner(observation_space, n_actions, config)


def check_state_backend(directory: Path, backend: str) -> None:
    """Refuse a device state generation another backend wrote, before anything is
    loaded or overwritten: switching backends would silently drop the saved optimizer
    state, and the next save would delete the other backend's file."""
    if (directory / STATE_FILES[backend]).exists():
        return
    for other, name in STATE_FILES.items():
        if (directory / name).exists():
            raise ConfigError("backend", f"{backend!r}, but the device state in {directory} "
                              f"was written by backend {other!r} ({name}); set backend = "
                              f"{other!r} for this device, or give it a new state-dir")
