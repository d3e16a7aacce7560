"""Q-network weights to and from Flower's ArrayRecord, checked on the way in.

Weights are the only tensors that cross the network, so every received set is checked
against the local network's layout before it touches a model: same tensor names, same
shapes, floating dtype, all values finite. A mismatch raises :class:`WeightsError`
naming the tensor, instead of a shape error deep inside ``load_state_dict``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn


class WeightsError(ValueError):
    """Received weights do not fit the local Q-network."""


def to_record(net: nn.Module) -> ArrayRecord:
    """The network's state dict as an ArrayRecord (what FedAvg averages)."""
    return ArrayRecord(net.state_dict())


def to_state_dict(record: ArrayRecord, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Convert and check ``record`` against ``reference``'s parameter layout."""
    expected = reference.state_dict()
    got = set(record.keys())
    if got != set(expected):
        missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
        raise WeightsError(f"weights do not match the Q-network: missing {missing}, "
                           f"unexpected {extra}")
    state: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        array = record[name].numpy()
        if tuple(array.shape) != tuple(ref.shape):
            raise WeightsError(f"tensor '{name}' has shape {tuple(array.shape)}, "
                               f"expected {tuple(ref.shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise WeightsError(f"tensor '{name}' has dtype {array.dtype}, expected floating")
        if not np.isfinite(array).all():
            raise WeightsError(f"tensor '{name}' contains NaN or Inf")
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return state
