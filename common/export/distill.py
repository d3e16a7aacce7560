"""Policy distillation: train a smaller Q-network to act like the teacher.

Following Rusu et al. (2016, "Policy Distillation"), the student minimises
``KL(softmax(Q_teacher / T) || softmax(Q_student))`` on states gathered by rolling out
the teacher. A low temperature ``T`` sharpens the teacher's Q-values into (nearly) its
greedy choice while keeping near-ties soft; Rusu et al. found this beat regressing Q-values
(MSE) for small students, because the student spends its capacity on the action ranking,
which is all that greedy acting uses, not on the Q-values' absolute scale. The student's
outputs are therefore action scores, not calibrated Q-values: fine for deployment, not a
starting point for further TD learning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fedq.common.config import FedqConfig
from fedq.common.export.finetune import fit_on_states
from fedq.common.network_registry import build_network
from fedq.common.networks import QNetwork


@dataclass(frozen=True)
class DistillReport:
    teacher_parameters: int
    student_parameters: int
    agreement: float  # fraction of training states where student and teacher act alike
    final_loss: float


def distill(teacher: QNetwork, states: np.ndarray, hidden_sizes: tuple[int, ...], *,
            temperature: float = 0.01, steps: int = 3000, batch_size: int = 256,
            lr: float = 1e-3, seed: int = 0) -> tuple[QNetwork, DistillReport]:
    """A student with ``hidden_sizes`` trained on the teacher's softened Q-values."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    torch.manual_seed(seed)
    student = build_network(replace(FedqConfig(), hidden_sizes=tuple(hidden_sizes)),
                            teacher.obs_dim, teacher.n_actions, "torch")
    x = torch.from_numpy(states)
    with torch.no_grad():
        teacher_q = teacher(x)
        target = F.softmax(teacher_q / temperature, dim=1)
    loss = fit_on_states(student, len(x), lambda idx: F.kl_div(
        F.log_softmax(student(x[idx]), dim=1), target[idx], reduction="batchmean"),
        steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with torch.no_grad():
        agreement = (student(x).argmax(1) == teacher_q.argmax(1)).float().mean().item()
    return student, DistillReport(
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
        student_parameters=sum(p.numel() for p in student.parameters()),
        agreement=agreement, final_loss=loss.item())
