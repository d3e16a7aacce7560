"""Q-network weights to and from Flower's ArrayRecord, checked on the way in.

Weights are the only tensors that cross the network, so every received set is checked
against the local network's layout before it touches a model: same tensor names, same
shapes, floating dtype, all values finite. A mismatch raises :class:`WeightsError`
naming the tensor, instead of a shape error deep inside ``load_state_dict``. The check
itself (:func:`check_arrays`) needs no torch, for the numpy backend's devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord

if TYPE_CHECKING:
    import torch
    from torch import nn


class WeightsError(ValueError):
    """Received weights do not fit the local Q-network."""


def to_record(net: nn.Module) -> ArrayRecord:
    """The network's state dict as an ArrayRecord (what FedAvg averages)."""
    return ArrayRecord(net.state_dict())


def to_state_dict(record: ArrayRecord, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Convert and check ``record`` against ``reference``'s parameter layout."""
    import torch

    layout = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    return {name: torch.from_numpy(a) for name, a in check_arrays(record, layout).items()}


def check_arrays(record: ArrayRecord,
                 layout: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``record``'s arrays as contiguous float32, checked against ``layout`` (state-dict
    name -> shape, e.g. :func:`common.mlp_params.mlp_layout`)."""
    got = set(record.keys())
    if got != set(layout):
        missing, extra = sorted(set(layout) - got), sorted(got - set(layout))
        raise WeightsError(f"weights do not match the Q-network: missing {missing}, "
                           f"unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    for name, shape in layout.items():
        array = record[name].numpy()
        if tuple(array.shape) != tuple(shape):
            raise WeightsError(f"tensor '{name}' has shape {tuple(array.shape)}, "
                               f"expected {tuple(shape)}")
        if not np.issubdtype(array.dtype, np.floating):
            raise WeightsError(f"tensor '{name}' has dtype {array.dtype}, expected floating")
        if not np.isfinite(array).all():
            raise WeightsError(f"tensor '{name}' contains NaN or Inf")
        arrays[name] = np.ascontiguousarray(array, dtype=np.float32)
    return arrays
