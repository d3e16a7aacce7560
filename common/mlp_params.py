"""The MLP Q-network's parameters as named numpy views of one flat float32 array.

Names and shapes are those of the torch :class:`common.networks.QNetwork`'s state dict
(``nn.Sequential`` numbers its modules and a ReLU follows every Linear but the last, so
Linear ``k`` is ``"{2k}.weight"`` (out, in) and ``"{2k}.bias"``): Flower ArrayRecords,
server checkpoints and exported policies are the same whichever backend a device runs,
and computing the layout needs no torch. One flat array lets the optimizer, the
gradient-norm clip and the target sync each be a handful of vector operations however
many layers the network has.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedq.common.config import FedqConfig

Layout = dict[str, tuple[int, ...]]


def mlp_layout(obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]) -> Layout:
    """State-dict names and shapes of ``QNetwork(obs_dim, n_actions, hidden_sizes)``."""
    widths = [obs_dim, *hidden_sizes, n_actions]
    layout: Layout = {}
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layout[f"{2 * k}.weight"] = (fan_out, fan_in)
        layout[f"{2 * k}.bias"] = (fan_out,)
    return layout


def build_mlp(config: FedqConfig, obs_shape: tuple[int, ...], n_actions: int) -> FlatParams:
    """The ``mlp`` network of :mod:`common.network_registry` on the numpy backend: its
    parameters, zero (the learner initialises them)."""
    return FlatParams(mlp_layout(int(np.prod(obs_shape)), n_actions, config.hidden_sizes))


class FlatParams:
    """Named float32 arrays that are views of one contiguous :attr:`flat` vector."""

    def __init__(self, layout: Layout) -> None:
        self.layout = dict(layout)
        self.flat = np.zeros(sum(int(np.prod(s)) for s in layout.values()), dtype=np.float32)
        self.views: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape in layout.items():
            size = int(np.prod(shape))
            self.views[name] = self.flat[offset:offset + size].reshape(shape)
            offset += size

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(weight (out, in), bias)`` per Linear layer, input side first."""
        names = list(self.views)
        return [(self.views[w], self.views[b]) for w, b in zip(names[::2], names[1::2],
                                                                 strict=True)]

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy ``arrays`` (same names and shapes) into the views, in place."""
        for name, view in self.views.items():
            np.copyto(view, arrays[name], casting="same_kind")

    def copy_dict(self) -> dict[str, np.ndarray]:
        """Independent copies of every named array."""
        return {name: view.copy() for name, view in self.views.items()}

    def init_like_torch(self, rng: np.random.Generator) -> None:
        """``nn.Linear``'s default initialisation: weight and bias uniform in
        +-1/sqrt(fan_in). Only a device's very first model before any global weights
        arrive uses it; the distribution, not torch's exact draws, is what matters."""
        for weight, bias in self.layers():
            bound = 1.0 / np.sqrt(weight.shape[1])
            weight[...] = rng.uniform(-bound, bound, weight.shape)
            bias[...] = rng.uniform(-bound, bound, bias.shape)
