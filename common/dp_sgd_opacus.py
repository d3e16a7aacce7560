"""DP-SGD gradients of any Q-network through Opacus: per-sample gradient norms, then one
clipped backward pass.

The closed form of :mod:`common.dp_sgd` covers MLPs; the CNNs take Opacus's
``GradSampleModuleFastGradientClipping`` with ghost clipping (Li et al., 2022; Bu et al.,
2023): a first backward pass computes each transition's gradient norm (for Linear layers
from activations and output gradients alone, never materialising the per-sample weight
gradients that make up most of a CNN's parameters in its dense layer; for convolutions
from their per-sample gradients), then a second backward pass of the per-sample losses
weighted by the clipping factors ``min(1, C / (norm + 1e-6))`` gives the sum of clipped
gradients. The rest is DP-SGD as :class:`common.dp_sgd.DPSGD` does it, with the same
interface and result: Gaussian noise of std ``noise_multiplier * C`` added, divided by the
expected batch size. ``tests/test_image_envs.py`` checks it against one backward pass per
transition; ``simulations/bench_cnn.py`` measures it against the plain update.
"""

from __future__ import annotations

import warnings

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn


class PerSampleDPSGD:
    """Writes DP-SGD gradients into the ``.grad`` of ``net``'s parameters."""

    def __init__(self, net: nn.Module, clip_norm: float, generator: torch.Generator) -> None:
        # hooks on net's own layers: the learner keeps calling net (and its optimizer
        # keeps stepping net's parameters); activations are captured only with grad on
        self.module = GradSampleModuleFastGradientClipping(
            net, max_grad_norm=clip_norm, use_ghost_clipping=True, loss_reduction="sum")
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
        norms = torch.zeros(0)
        for p in self.params:
            p.grad = None
        if losses.shape[0]:  # an empty Poisson batch: the step is noise alone
            with warnings.catch_warnings():  # the frames need no gradient: expected
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                losses.sum().backward(retain_graph=True)  # hooks: per-sample norms
                norms = self.module.get_norm_sample()
                scale = self.module.get_clipping_coef().detach()
                for p in self.params:
                    p.grad = None
                self.module.disable_hooks()
                try:
                    (scale * losses).sum().backward()  # the sum of clipped gradients
                finally:
                    self.module.enable_hooks()
        with torch.no_grad():
            for p in self.params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                noise = torch.empty_like(p).normal_(generator=self.generator)
                grad.add_(noise, alpha=noise_multiplier * self.clip_norm)
                p.grad = grad.div_(expected_batch_size)
        return norms
