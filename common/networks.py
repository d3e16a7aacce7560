"""Q-network definitions and a torch-free greedy forward pass for acting.

Acting is the hot path of data collection: one batch-1 forward per env step. Torch's
per-call overhead (~30 µs) dwarfs the arithmetic of a small MLP, so :class:`NumpyPolicy`
runs the same forward in numpy (~5 µs, :mod:`common.mlp_forward`, which the torch-free
on-device runner shares) on *views* of the live torch parameters. The
views share memory with the tensors, and both the optimizer and ``load_state_dict``
update parameters in place, so the numpy policy never needs re-syncing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedq.common.mlp_forward import MlpForward

if TYPE_CHECKING:
    from fedq.common.config import FedqConfig


class QNetwork(nn.Sequential):
    """MLP mapping a flat observation to one Q-value per discrete action."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        width = obs_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, n_actions))
        super().__init__(*layers)
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.hidden_sizes = tuple(hidden_sizes)

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


def build_mlp(config: FedqConfig, obs_shape: tuple[int, ...], n_actions: int) -> QNetwork:
    """The ``mlp`` network of :mod:`common.network_registry` on the torch backend."""
    return QNetwork(int(np.prod(obs_shape)), n_actions, config.hidden_sizes)


class NumpyPolicy(MlpForward):
    """Greedy action of a :class:`QNetwork`, computed in numpy on shared parameter views."""

    def __init__(self, net: QNetwork) -> None:
        super().__init__([(layer.weight.detach().numpy().T, layer.bias.detach().numpy())
                          for layer in net.linear_layers()])


class TorchPolicy:
    """Greedy action of any torch Q-network (the CNNs), one observation at a time.

    The numpy fast path of :class:`NumpyPolicy` covers MLPs only; a convolution's
    arithmetic dwarfs torch's per-call overhead anyway."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        return self.net(torch.as_tensor(np.asarray(obs)).unsqueeze(0))[0].numpy()

    def act(self, obs: np.ndarray) -> int:
        return int(self.q_values(obs).argmax())


def greedy_policy(net: nn.Module) -> NumpyPolicy | TorchPolicy:
    """The fastest greedy policy that acts with ``net``'s live parameters."""
    return NumpyPolicy(net) if isinstance(net, QNetwork) else TorchPolicy(net)
