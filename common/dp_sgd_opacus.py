"""DP-SGD gradients of any Q-network through Opacus's per-sample gradients.

The closed form of :mod:`common.dp_sgd` covers Linear layers; a convolution's
per-sample weight gradient is no outer product, so the CNNs take Opacus's
``GradSampleModule``: its hooks give every parameter a ``grad_sample`` of shape
``(batch, *param.shape)`` from one backward pass. The rest is DP-SGD as
:class:`common.dp_sgd.DPSGD` does it, with the same interface and result: each
transition's gradient clipped to ``C`` (Opacus's ``C / (norm + 1e-6)`` factor), summed,
Gaussian noise of std ``noise_multiplier * C`` added, divided by the expected batch size.
Its cost against the plain update: ``simulations/bench_cnn.py``.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule
from torch import nn


class PerSampleDPSGD:
    """Writes DP-SGD gradients into the ``.grad`` of ``net``'s parameters."""

    def __init__(self, net: nn.Module, clip_norm: float, generator: torch.Generator) -> None:
        # hooks on net's own layers: the learner keeps calling net (and its optimizer
        # keeps stepping net's parameters); activations are captured only with grad on
        self.module = GradSampleModule(net, loss_reduction="sum")  # we sum the losses
        self.clip_norm = clip_norm
        self.generator = generator
        self.params = [p for p in net.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, losses: torch.Tensor, noise_multiplier: float,
                 expected_batch_size: float) -> torch.Tensor:
        """Set each ``.grad`` to (sum of clipped per-sample gradients + N(0, (sigma C)^2))
        / ``expected_batch_size``, for the per-sample ``losses`` of the last
        :meth:`forward`. Returns the per-sample gradient norms before clipping."""
        n = losses.shape[0]
        if n:
            with warnings.catch_warnings():  # the frames need no gradient: expected
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                losses.sum().backward()
            samples = [p.grad_sample for p in self.params]
            norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in samples], 1).norm(dim=1)
            scale = (self.clip_norm / (norms + 1e-6)).clamp_(max=1.0)
        else:  # an empty Poisson batch: the step is noise alone
            samples, norms, scale = [None] * len(self.params), torch.zeros(0), None
        with torch.no_grad():
            for p, g in zip(self.params, samples, strict=True):
                grad = (torch.einsum("i,i...->...", scale, g) if g is not None
                        else torch.zeros_like(p))
                noise = torch.empty_like(p).normal_(generator=self.generator)
                grad.add_(noise, alpha=noise_multiplier * self.clip_norm)
                p.grad = grad.div_(expected_batch_size)
                p.grad_sample = None
        return norms
