"""ONNX export of a Q-network, for devices that run onnxruntime instead of fedq's runner.

``torch.onnx.export`` in torch 2.13 uses the ``torch.export``-based exporter by default,
which needs the ``onnx`` and ``onnxscript`` packages (the old TorchScript exporter is
deprecated); they are fedq's optional ``[export]`` extra, never a core dependency, and a
device needs only ``onnxruntime``. The graph takes ``obs`` of shape ``(batch, obs_dim)``
(an MLP) or uint8 frames ``(batch, *obs_shape)`` (a CNN; batch is dynamic) and returns
``q`` of shape ``(batch, n_actions)``; the env id and variant ride along as ONNX metadata
so the file still says what it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch
from torch import nn

from fedq.common.atomic import atomic_open
from fedq.common.networks import QNetwork


class OnnxUnavailableError(RuntimeError):
    """The optional ONNX export packages are not installed."""


def onnx_available() -> bool:
    """Whether the optional ``[export]`` packages the ONNX exporter needs are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def export_onnx(net: nn.Module, path: Path, metadata: dict[str, str]) -> int:
    """Write ``net`` as a self-contained ONNX file; returns its size in bytes. An MLP takes
    float rows ``(batch, obs_dim)``, a CNN uint8 frames ``(batch, *obs_shape)``."""
    try:
        import onnx  # noqa: F401  (the exporter imports it lazily; fail early and clearly)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise OnnxUnavailableError(
            f"ONNX export needs the optional packages onnx and onnxscript ({err.name} is "
            "missing): pip install 'fedq[export]'") from None
    net = net.eval()
    example = (torch.zeros(1, net.obs_dim) if isinstance(net, QNetwork)
               else torch.zeros((1, *net.obs_shape), dtype=torch.uint8))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        program = torch.onnx.export(
            net, (example,), None, input_names=["obs"],
            output_names=["q"], dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False, dynamo=True, verbose=False)
    model = program.model_proto
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    data = model.SerializeToString()
    with atomic_open(path) as fh:
        fh.write(data)
    return len(data)
