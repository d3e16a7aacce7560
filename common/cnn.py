"""Convolutional Q-networks for camera frames: the Nature-DQN architecture and a smaller
edge variant (``network = "nature-cnn"`` / ``"edge-cnn"``, :mod:`common.network_registry`).

They take the replay buffer's uint8 frames as stored (no float copy of a 100k-frame
buffer ever exists) and scale a batch to [0, 1] on the way in. Observation layouts, as
gymnasium's wrappers produce them (:mod:`common.envs`): ``(H, W)`` grayscale, ``(H, W, C)``
colour, ``(k, H, W)`` a stack of k grayscale frames, ``(k, H, W, C)`` a stack of colour
frames; all become ``(channels, H, W)`` for the convolutions. ``(H, W, C)`` and ``(k, H,
W)`` are told apart by the last axis: a colour axis has at most 4 entries, an image side
more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fedq.common.config import FedqConfig

MAX_COLOUR_CHANNELS = 4


def channels_last(obs_shape: tuple[int, ...]) -> bool:
    """Whether the last axis of an image observation holds colour channels."""
    return len(obs_shape) == 4 or (len(obs_shape) == 3
                                   and obs_shape[-1] <= MAX_COLOUR_CHANNELS < obs_shape[0])


def conv_input_shape(obs_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(channels, H, W)`` the convolutions see for an observation of ``obs_shape``."""
    if len(obs_shape) == 2:
        return (1, *obs_shape)
    if len(obs_shape) == 3:
        if channels_last(obs_shape):
            return (obs_shape[2], obs_shape[0], obs_shape[1])
        return obs_shape  # type: ignore[return-value]
    if len(obs_shape) == 4:
        k, h, w, c = obs_shape
        return (k * c, h, w)
    raise ValueError(f"an image observation has 2 to 4 dimensions, not shape {obs_shape}")


class ConvQNetwork(nn.Module):
    """Conv layers (each followed by ReLU), flatten, a ReLU dense layer, the Q head."""

    def __init__(self, obs_shape: tuple[int, ...], n_actions: int,
                 convs: tuple[tuple[int, int, int], ...], dense: int) -> None:
        """``convs``: (out channels, kernel, stride) per layer."""
        super().__init__()
        self.obs_shape = tuple(obs_shape)
        self.n_actions = n_actions
        self._channels_last = channels_last(self.obs_shape)
        channels, height, width = conv_input_shape(self.obs_shape)
        layers: list[nn.Module] = []
        for out, kernel, stride in convs:
            layers += [nn.Conv2d(channels, out, kernel, stride), nn.ReLU()]
            channels = out
            height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
            if height < 1 or width < 1:
                raise ValueError(f"observation {obs_shape} is too small for this network's "
                                 f"convolutions (kernel {kernel}, stride {stride})")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(channels * height * width, dense), nn.ReLU(),
                                  nn.Linear(dense, n_actions))

    def to_conv_input(self, obs: torch.Tensor) -> torch.Tensor:
        """A batch of observations as float ``(B, channels, H, W)`` in [0, 1]."""
        x = obs.float() / 255.0
        if x.ndim == 3:  # (B, H, W)
            return x.unsqueeze(1)
        if x.ndim == 5:  # (B, k, H, W, C)
            b, k, h, w, c = x.shape
            return x.permute(0, 1, 4, 2, 3).reshape(b, k * c, h, w)
        return x.permute(0, 3, 1, 2) if self._channels_last else x

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.to_conv_input(obs)))


def build_nature_cnn(config: FedqConfig, obs_shape: tuple[int, ...],
                     n_actions: int) -> ConvQNetwork:
    """Mnih et al. (2015), Nature 518, "Methods": 32 8x8/4, 64 4x4/2, 64 3x3/1, 512."""
    return ConvQNetwork(obs_shape, n_actions, ((32, 8, 4), (64, 4, 2), (64, 3, 1)), 512)


def build_edge_cnn(config: FedqConfig, obs_shape: tuple[int, ...],
                   n_actions: int) -> ConvQNetwork:
    """Half the channels and one conv layer fewer than Nature's, a 128-unit dense layer:
    a fifth of its parameters at 4x84x84 (0.34 M against 1.69 M)."""
    return ConvQNetwork(obs_shape, n_actions, ((16, 8, 4), (32, 4, 2)), 128)
