"""Quantisation-aware fine-tuning for the int8 format.

Plain post-training int8 (round each weight row to 255 levels) keeps a converged
CartPole DQN's greedy action in only ~60% of its states, and its greedy return falls
from 500 to ~90: the action gaps are ~0.1% of the Q-values (see
:mod:`common.export.finetune`). So before encoding, a copy of the teacher is fine-tuned
towards the teacher with its forward pass seeing the weights *as int8 will store them*
(per-row symmetric rounding, output layer centred exactly as
:mod:`common.export.encodings` stores it), gradients passing the rounding unchanged
(straight-through estimator). The weights it ends with are then encoded as usual.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from common.export.encodings import INT8_MAX
from common.export.finetune import finetune_to_teacher
from common.networks import QNetwork


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded per row to int8 levels with float16 scales (as stored) in the forward
    pass, identity in the backward."""
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / INT8_MAX).half().float()
    q = torch.clamp(torch.round(w / scale.clamp_min(1e-30)), -INT8_MAX, INT8_MAX) * scale
    return w + (q - w).detach()


def fake_fp16(b: torch.Tensor) -> torch.Tensor:
    """``b`` rounded to float16 (how int8 files store biases), identity in the backward."""
    return b + (b.half().float() - b).detach()


def int8_forward(net: QNetwork, x: torch.Tensor) -> torch.Tensor:
    """``net``'s forward pass with the weights and biases int8 encoding will store."""
    layers = net.linear_layers()
    h = x
    for layer in layers[:-1]:
        h = F.relu(F.linear(h, fake_quant(layer.weight), fake_fp16(layer.bias)))
    out = layers[-1]
    mean_w = out.weight.mean(dim=0, keepdim=True)
    mean_b = out.bias.mean(dim=0, keepdim=True)
    return F.linear(h, fake_quant(mean_w) + fake_quant(out.weight - mean_w),
                    fake_fp16(mean_b) + fake_fp16(out.bias - mean_b))


def quantisation_aware_copy(teacher: QNetwork, states: np.ndarray, *, steps: int = 2000,
                            lr: float = 3e-4, seed: int = 0) -> QNetwork:
    """A copy of ``teacher`` whose int8-rounded forward pass matches the teacher."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    finetune_to_teacher(student, teacher, states, forward=int8_forward, steps=steps, lr=lr,
                        seed=seed)
    return student
