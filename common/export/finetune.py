"""Fine-tune a compressed copy of the teacher back to the teacher's behaviour.

Used by pruning (fixed masks, re-applied after every step through ``after_step``). It
matches the teacher's greedy choices, ``KL(softmax(Q_teacher / T) || softmax(Q_student /
T))`` at ``T = 0.01`` (the temperature of Rusu et al.'s policy distillation). A converged
DQN's Q-values share a large state value (~80 on CartPole) and differ by action gaps of
~0.02% of it; adding a Q-value MSE, as this did before, spends the pruned network's
capacity on that shared value: on CartPole's teacher pruned 75% it reached 0.85
greedy-action agreement with the MSE and 0.96 without. Like the student's
(:mod:`common.export.distill`), the fine-tuned outputs are then action scores, not
calibrated Q-values: fine for acting greedily, not for further TD learning.
The training loop itself (:func:`fit_on_states`) also serves distillation
(:mod:`common.export.distill`), which differs only in its loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedq.common.networks import QNetwork


def match_teacher_loss(q: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
                       ) -> torch.Tensor:
    """The KL between temperature-softened greedy choices (blind to a shared offset)."""
    return F.kl_div(F.log_softmax(q / temperature, dim=1), teacher_probs,
                    reduction="batchmean")


def fit_on_states(student: QNetwork, n_states: int,
                  batch_loss: Callable[[torch.Tensor], torch.Tensor], *,
                  after_step: Callable[[], None] | None = None, steps: int, batch_size: int,
                  lr: float, seed: int) -> torch.Tensor:
    """Adam on ``student``: ``steps`` steps on ``batch_loss(indices)`` of uniformly drawn
    batches of the ``n_states`` teacher states; returns the last batch's loss. The one
    training loop of fine-tuning and distillation."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = batch_loss(torch.randint(n_states, (batch_size,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return loss


def finetune_to_teacher(student: QNetwork, teacher: QNetwork, states: np.ndarray, *,
                        after_step: Callable[[], None] | None = None, steps: int = 2000,
                        batch_size: int = 256, lr: float = 1e-3, temperature: float = 0.01,
                        seed: int = 0) -> float:
    """Train ``student`` in place (``after_step`` runs after every optimizer step);
    returns the final full-data loss."""
    x = torch.from_numpy(states)
    with torch.no_grad():
        teacher_probs = F.softmax(teacher(x) / temperature, dim=1)
    fit_on_states(student, len(x), lambda idx: match_teacher_loss(
        student(x[idx]), teacher_probs[idx], temperature),
        after_step=after_step, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    with torch.no_grad():
        return match_teacher_loss(student(x), teacher_probs, temperature).item()
