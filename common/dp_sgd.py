"""DP-SGD gradients of an MLP: each transition's gradient clipped, then Gaussian noise.

For a Linear layer applied to a ``(batch, features)`` input ``a``, transition ``i``'s
weight gradient is the outer product ``g_i a_i^T`` (``g_i``: the loss gradient at the
layer's output), so its norm is ``|g_i| |a_i|`` and its bias gradient is ``g_i``. One
backward pass to the layer outputs therefore gives every per-transition gradient norm in
closed form ("ghost clipping", Goodfellow 2015; Li et al. 2022), and the clipped sum
``sum_i c_i g_i a_i^T`` is one matmul: no per-sample gradient is ever materialised.

Why not Opacus's per-sample machinery: on fedq's tiny Q-networks its per-layer hooks and
bookkeeping cost more than the arithmetic (3.8x a plain update at batch 64, 6.5x at 256;
see ``simulations/bench_dp_cost.py`` for all modes measured). The result is the same as
Opacus's ``DPOptimizer`` (sum of per-sample gradients clipped to ``C``, plus noise of
std ``noise_multiplier * C``, divided by the expected batch size), and
``tests/test_privacy.py`` checks the norms and clipped sums against Opacus's
``GradSampleModule``. Accounting stays with Opacus (:mod:`common.privacy`).
"""

from __future__ import annotations

import torch
from torch import nn


class DPSGD:
    """Writes DP-SGD gradients into the ``.grad`` of a Sequential of Linear layers and
    parameter-free elementwise layers (fedq's :class:`common.networks.QNetwork`)."""

    def __init__(self, net: nn.Sequential, clip_norm: float,
                 generator: torch.Generator) -> None:
        for module in net:
            if not isinstance(module, nn.Linear) and any(True for _ in module.parameters()):
                raise TypeError(f"closed-form per-sample norms cover Linear layers only, "
                                f"not {type(module).__name__}")
            if isinstance(module, nn.Linear) and module.bias is None:
                raise TypeError("closed-form per-sample norms assume Linear layers with bias")
        self.net = net
        self.clip_norm = clip_norm
        self.generator = generator
        self.linears = [m for m in net if isinstance(m, nn.Linear)]
        # every .grad is a view of one flat tensor: noise and scaling are one op each
        params = [p for layer in self.linears for p in (layer.weight, layer.bias)]
        self._flat_grad = torch.zeros(sum(p.numel() for p in params))
        self._noise = torch.empty_like(self._flat_grad)
        offset = 0
        for p in params:
            p.grad = self._flat_grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The net's output, remembering each Linear layer's input and output."""
        inputs, outputs = [], []
        for module in self.net:
            if isinstance(module, nn.Linear):
                inputs.append(x.detach())
                x = module(x)
                outputs.append(x)
            else:
                x = module(x)
        self._inputs, self._outputs = inputs, outputs
        return x

    def backward(self, losses: torch.Tensor, noise_multiplier: float,
                 expected_batch_size: float) -> torch.Tensor:
        """Set each ``.grad`` to (sum of clipped per-sample gradients + N(0, (sigma C)^2))
        / ``expected_batch_size``, for the per-sample ``losses`` of the last
        :meth:`forward`. Returns the per-sample gradient norms before clipping."""
        output_grads = torch.autograd.grad(losses.sum(), self._outputs)
        squared = torch.zeros(losses.shape[0])
        for a, g in zip(self._inputs, output_grads, strict=True):
            squared += g.square().sum(1) * (a.square().sum(1) + 1.0)  # weight + bias
        norms = squared.sqrt()
        scale = (self.clip_norm / (norms + 1e-6)).clamp_(max=1.0).unsqueeze(1)  # as Opacus
        for layer, a, g in zip(self.linears, self._inputs, output_grads, strict=True):
            clipped = g * scale
            torch.mm(clipped.T, a, out=layer.weight.grad)
            torch.sum(clipped, 0, out=layer.bias.grad)
        self._noise.normal_(generator=self.generator)
        self._flat_grad.add_(self._noise, alpha=noise_multiplier * self.clip_norm)
        self._flat_grad.div_(expected_batch_size)
        self._inputs, self._outputs = [], []
        return norms
