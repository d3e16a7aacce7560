"""A run's first global model taken from a checkpoint (run config ``initial-weights``).

Fine-tuning starts from weights someone already has: a policy pretrained on a public
simulator (no device data, so no privacy cost; docs/privacy.md), or another run's
``best.pt``. The ServerApp reads the file before round 1 and checks it against the
network this run's config builds, tensor by tensor, so a file of another architecture
fails before any device trains, naming the field, the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedq.common.config import ConfigError

FIELD = "initial-weights"


def load_initial_weights(path: str, net: torch.nn.Module) -> None:
    """Load the Q-network of the fedq checkpoint at ``path`` (a dict with a
    ``state_dict``, as the run directory writes them, or a bare state dict) into ``net``;
    raise :class:`ConfigError` naming the field if it is missing, unreadable or does not
    fit ``net``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(FIELD, f"no checkpoint file '{file}' (on the ServerApp's machine)")
    try:
        saved: Any = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for torn or foreign files
        raise ConfigError(FIELD, f"'{file}' cannot be loaded as a checkpoint: "
                          f"{type(err).__name__}: {str(err)[:200]}") from None
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConfigError(FIELD, f"'{file}' holds no Q-network state dict")
    expected = net.state_dict()
    if set(state) != set(expected):
        raise ConfigError(FIELD, f"'{file}' has tensors {sorted(state)}, this run's network "
                          f"(hidden-sizes, network, env) has {sorted(expected)}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ConfigError(FIELD, f"'{file}': tensor '{name}' has shape "
                              f"{tuple(state[name].shape)}, this run's network needs "
                              f"{tuple(tensor.shape)}")
        if not torch.isfinite(state[name]).all():
            raise ConfigError(FIELD, f"'{file}': tensor '{name}' holds NaN or inf")
    net.load_state_dict(state)
