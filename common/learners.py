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
from typing import Protocol

import numpy as np

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.mlp_forward import MlpForward
from fedq.common.privacy import DevicePrivacy
from fedq.common.replay_buffer import ReplayBuffer

STATE_FILES = {"torch": "learner.pt", "numpy": "learner.npz"}
"""The learner state file each backend writes into a device's state generation (the
learners import it from here; this module imports them only inside make_learner)."""


class Learner(Protocol):
    """What the trainer and the ClientApp use of a learner."""

    backend: str
    policy: MlpForward

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


def make_learner(obs_dim: int, n_actions: int, config: FedqConfig,
                 privacy: DevicePrivacy | None, seed: int) -> Learner:
    """The configured backend's learner, with DP-SGD when ``privacy`` is given."""
    if config.backend == "numpy":
        from fedq.common.numpy_learner import NumpyDQNLearner, PrivateNumpyDQNLearner

        if privacy is None:
            return NumpyDQNLearner(obs_dim, n_actions, config, seed)
        return PrivateNumpyDQNLearner(obs_dim, n_actions, config, privacy, seed)
    import torch

    from fedq.common.dqn import DQNLearner, PrivateDQNLearner

    torch.manual_seed(seed)
    if privacy is None:
        return DQNLearner(obs_dim, n_actions, config)
    return PrivateDQNLearner(obs_dim, n_actions, config, privacy)


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
