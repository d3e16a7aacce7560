"""Magnitude pruning with fixed masks, then fine-tuning back to the teacher.

Each Linear layer loses the same fraction of its smallest-magnitude weights (biases are
kept: they are few and cheap). Pruning shifts every Q-value, so the pruned network is
then fine-tuned towards the unpruned one on states the teacher visits
(:mod:`common.export.finetune`) with the masks held fixed: pruned weights are zeroed
again after every optimizer step, so Adam's momentum cannot revive them. Matching the
teacher, not TD targets, needs no environment interaction on the export machine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from fedq.common.export.finetune import finetune_to_teacher
from fedq.common.networks import QNetwork


@dataclass(frozen=True)
class PruneReport:
    sparsity: float  # fraction of weights (not biases) that are zero
    agreement_before: float  # greedy-action agreement with the teacher right after pruning
    agreement_after: float  # ... and after fine-tuning (on the fine-tuning states)


def magnitude_masks(net: QNetwork, sparsity: float) -> list[torch.Tensor]:
    """Per-layer masks keeping the largest ``1 - sparsity`` of each weight matrix."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    masks = []
    for layer in net.linear_layers():
        magnitude = layer.weight.detach().abs().reshape(-1)
        n_pruned = round(sparsity * magnitude.numel())
        mask = torch.ones_like(magnitude)
        mask[torch.argsort(magnitude)[:n_pruned]] = 0.0
        masks.append(mask.reshape(layer.weight.shape))
    return masks


def prune_and_finetune(teacher: QNetwork, states: np.ndarray, sparsity: float, *,
                       steps: int = 2000, seed: int = 0) -> tuple[QNetwork, PruneReport]:
    """A pruned copy of ``teacher`` fine-tuned on ``states``; the teacher is unchanged."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    masks = magnitude_masks(student, sparsity)
    layers = student.linear_layers()

    @torch.no_grad()
    def apply_masks() -> None:
        for layer, mask in zip(layers, masks, strict=True):
            layer.weight.mul_(mask)

    apply_masks()
    before = greedy_agreement(student, teacher, states)
    finetune_to_teacher(student, teacher, states, after_step=apply_masks, steps=steps,
                        seed=seed)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in layers)
    return student, PruneReport(sparsity=zeros / total, agreement_before=before,
                                agreement_after=greedy_agreement(student, teacher, states))


@torch.no_grad()
def greedy_agreement(net: QNetwork, teacher: QNetwork, states: np.ndarray) -> float:
    x = torch.from_numpy(states)
    return (net(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
