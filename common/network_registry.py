"""The Q-network architectures a run can choose (``network`` config key), one registration
each, and the one factory that builds them.

A :class:`NetworkSpec` says which device backends serve a network (``torch``, ``numpy``)
and which observation spaces it accepts (flat ``vector`` rows or uint8 ``image`` frames).
Everything else derives from the registry: config validation accepts exactly the
registered names and refuses a network on a backend that does not serve it, the
environment check refuses an observation space the network cannot read (both naming the
field, before any process starts), ``python -m fedq.common.config_docs`` writes the table in
``docs/networks.md``, and every place that needs a Q-network (the learners, the server's
initial model, evaluation, export) calls :func:`build_network`. Adding an architecture is
one :func:`register_network` call.

The registry is torch-free, as devices on the numpy backend have no torch: a spec's
builders import their module only when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import gymnasium as gym

    from fedq.common.config import FedqConfig

VECTOR = "vector"  # a Box of floats (any shape: the MLP env flattens it to one row)
IMAGE = "image"  # a uint8 Box of 2-4 dimensions: (H, W), (H, W, C), (k, H, W), (k, H, W, C)
OBSERVATION_KINDS = (VECTOR, IMAGE)

Builder = Callable[["FedqConfig", tuple[int, ...], int], Any]


@dataclass(frozen=True)
class NetworkSpec:
    """One Q-network architecture.

    ``builders`` maps a backend to ``"module:function"``; the function takes ``(config,
    observation shape, n_actions)`` and returns the backend's network (a torch
    ``nn.Module``; on numpy, :class:`common.mlp_params.FlatParams`). ``observations``:
    the observation kinds it reads.
    """

    name: str
    doc: str
    builders: dict[str, str]
    observations: tuple[str, ...]
    keys: tuple[str, ...] = ()

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.builders)


NETWORK_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(spec: NetworkSpec) -> NetworkSpec:
    """Add ``spec`` to the registry; a name can be registered once."""
    if spec.name in NETWORK_REGISTRY:
        raise ValueError(f"network {spec.name!r} is already registered")
    unknown = set(spec.observations) - set(OBSERVATION_KINDS)
    if unknown or not spec.observations:
        raise ValueError(f"network {spec.name!r}: observations must be some of "
                         f"{OBSERVATION_KINDS}, got {spec.observations}")
    if not spec.builders:
        raise ValueError(f"network {spec.name!r}: needs a builder for at least one backend")
    NETWORK_REGISTRY[spec.name] = spec
    return spec


def network_names() -> tuple[str, ...]:
    """The registered network names, in registration order."""
    return tuple(NETWORK_REGISTRY)


def network_spec(name: str) -> NetworkSpec:
    """The registered spec of ``name`` (config validation has refused other names)."""
    try:
        return NETWORK_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; registered: "
                         f"{', '.join(network_names())}") from None


def observation_kind(shape: tuple[int, ...], dtype: np.dtype) -> str:
    """``image`` for uint8 observations of 2 to 4 dimensions (camera frames, stacked or
    not), ``vector`` for everything else."""
    return IMAGE if np.dtype(dtype) == np.uint8 and 2 <= len(shape) <= 4 else VECTOR


def observation_shape(observation_space: gym.spaces.Box | int) -> tuple[tuple[int, ...], Any]:
    """``(shape, dtype)`` of a Box; an int ``n`` stands for a flat float32 row of ``n``
    values (what the MLP-only tools and tests pass)."""
    if isinstance(observation_space, int | np.integer):
        return (int(observation_space),), np.dtype(np.float32)
    return tuple(int(d) for d in observation_space.shape), np.dtype(observation_space.dtype)


def build_network(config: FedqConfig, observation_space: gym.spaces.Box | int,
                  n_actions: int, backend: str | None = None) -> Any:
    """The ``network`` of ``config`` for ``observation_space`` and ``n_actions``, on
    ``backend`` (default: the config's). The one place a Q-network is built: draws from
    torch's global RNG exactly as the layers it creates do, nothing else."""
    spec = network_spec(config.network)
    backend = backend or config.backend
    if backend not in spec.builders:
        raise ValueError(f"network {spec.name!r} has no {backend!r} backend (it has "
                         f"{', '.join(spec.backends)})")
    module, _, function = spec.builders[backend].partition(":")
    shape, _ = observation_shape(observation_space)
    return getattr(importlib.import_module(module), function)(config, shape, int(n_actions))


register_network(NetworkSpec(
    "mlp", "fully connected ReLU layers of widths hidden-sizes on the flattened observation",
    {"torch": "fedq.common.networks:build_mlp", "numpy": "fedq.common.mlp_params:build_mlp"},
    (VECTOR,), keys=("hidden-sizes",)))
register_network(NetworkSpec(
    "nature-cnn", "Mnih et al. (2015)'s DQN: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, dense 512, "
    "on uint8 frames scaled to [0, 1] (1.69 M parameters at 4x84x84, 5 actions)",
    {"torch": "fedq.common.cnn:build_nature_cnn"}, (IMAGE,)))
register_network(NetworkSpec(
    "edge-cnn", "a smaller CNN for edge devices: conv 16x8x8/4, 32x4x4/2, dense 128 "
    "(0.34 M parameters at 4x84x84, 5 actions)",
    {"torch": "fedq.common.cnn:build_edge_cnn"}, (IMAGE,)))
