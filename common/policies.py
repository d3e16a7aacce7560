"""The greedy policy of a set of global weights, for evaluation on a device.

An MLP's runs in numpy (:class:`common.mlp_forward.MlpForward`): a device on the numpy
backend evaluates without importing torch. Other networks (the CNNs) are built by the
network factory in torch, which only the torch backend serves anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedq.common.config import FedqConfig
from fedq.common.envs import EnvSpec
from fedq.common.mlp_forward import MlpForward
from fedq.common.mlp_params import Layout
from fedq.common.network_registry import build_network, network_spec


def network_layout(config: FedqConfig, spec: EnvSpec) -> Layout:
    """State-dict names and shapes of the run's Q-network on ``spec``'s env (built by the
    factory on the numpy backend where it serves the network: no torch import)."""
    if "numpy" in network_spec(config.network).backends:
        return build_network(config, spec.observation_space, spec.n_actions, "numpy").layout
    net = build_network(config, spec.observation_space, spec.n_actions, "torch")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def global_policy(config: FedqConfig, spec: EnvSpec, arrays: Mapping[str, np.ndarray]) -> Any:
    """Something with ``act(obs) -> int`` acting greedily with ``arrays`` (checked
    against :func:`network_layout` already)."""
    if config.network == "mlp":
        names = list(arrays)
        return MlpForward([(arrays[w].T, arrays[b])
                           for w, b in zip(names[::2], names[1::2], strict=True)])
    import torch

    from fedq.common.networks import TorchPolicy

    net = build_network(config, spec.observation_space, spec.n_actions, "torch")
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    return TorchPolicy(net.eval())
