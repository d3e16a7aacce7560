"""Magnitude pruning with fixed masks, then fine-tuning back to the teacher.

The pruned weights are taken from the largest matrices first, each pruned at most
``MAX_LAYER_SPARSITY``, biases kept (they are few and cheap). Pruning every matrix by the
same fraction collapsed CartPole's 64-64 teacher: its input layer has only 4 weights per
unit and its output layer 64 per action, so 75% of them gone left hidden units blind to
the state and the actions' gap rows gutted (greedy-action agreement 0.50 right after
pruning, 0.51-0.74 after fine-tuning, greedy return 22 of 500). The 64x64 matrix holds
91% of the weights and can absorb the whole 75% alone (0.96 agreement).

The pruned network is then fine-tuned to act like the unpruned one on states the teacher
visits (:mod:`common.export.finetune`) with the masks held fixed: pruned weights are
zeroed again after every optimizer step, so Adam's momentum cannot revive them. Matching
the teacher, not TD targets, needs no environment interaction on the export machine.
A pruned network that still acts unlike the teacher on more than ``1 - min_agreement``
of those states raises :class:`PruneError` instead of being written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from fedq.common.export.finetune import finetune_to_teacher
from fedq.common.networks import QNetwork

MAX_LAYER_SPARSITY = 0.9  # no matrix loses more: each unit keeps some of its inputs


class PruneError(ValueError):
    """Pruning cannot reach the sparsity asked for, or the result acts unlike the teacher."""


@dataclass(frozen=True)
class PruneReport:
    sparsity: float  # fraction of weights (not biases) that are zero
    layer_sparsity: list[float]  # ... of each weight matrix, input layer first
    agreement_before: float  # greedy-action agreement with the teacher right after pruning
    agreement_after: float  # ... and after fine-tuning (on the fine-tuning states)


def magnitude_masks(net: QNetwork, sparsity: float) -> list[torch.Tensor]:
    """Masks zeroing ``sparsity`` of all weights, the smallest-magnitude ones of the
    largest matrices first, none pruned beyond ``MAX_LAYER_SPARSITY``."""
    if not 0.0 <= sparsity < 1.0:
        raise PruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    weights = [layer.weight.detach() for layer in net.linear_layers()]
    sizes = [w.numel() for w in weights]
    left = round(sparsity * sum(sizes))
    n_pruned = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -sizes[i]):
        n_pruned[i] = min(left, int(MAX_LAYER_SPARSITY * sizes[i]))
        left -= n_pruned[i]
    if left > 0:
        raise PruneError(f"--sparsity {sparsity} needs more than {MAX_LAYER_SPARSITY:.0%} "
                         "of some weight matrix pruned; ask for less")
    masks = []
    for w, n in zip(weights, n_pruned, strict=True):
        mask = torch.ones(w.numel())
        mask[torch.argsort(w.abs().reshape(-1))[:n]] = 0.0
        masks.append(mask.reshape(w.shape))
    return masks


def prune_and_finetune(teacher: QNetwork, states: np.ndarray, sparsity: float, *,
                       steps: int = 2000, seed: int = 0, min_agreement: float = 0.9
                       ) -> tuple[QNetwork, PruneReport]:
    """A pruned copy of ``teacher`` fine-tuned on ``states``; the teacher is unchanged.
    Raises :class:`PruneError` if it agrees with the teacher on fewer than
    ``min_agreement`` of ``states``."""
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
    after = greedy_agreement(student, teacher, states)
    if after < min_agreement:
        raise PruneError(f"pruned to --sparsity {sparsity}, the network acts like the teacher "
                         f"in {after:.1%} of {len(states)} teacher states (< "
                         f"{min_agreement:.0%}); not writing it: lower --sparsity or raise "
                         "--finetune-steps")
    zeros = [int((layer.weight == 0).sum()) for layer in layers]
    sizes = [layer.weight.numel() for layer in layers]
    return student, PruneReport(sparsity=sum(zeros) / sum(sizes),
                                layer_sparsity=[z / n for z, n in zip(zeros, sizes, strict=True)],
                                agreement_before=before, agreement_after=after)


@torch.no_grad()
def greedy_agreement(net: QNetwork, teacher: QNetwork, states: np.ndarray) -> float:
    x = torch.from_numpy(states)
    return (net(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
