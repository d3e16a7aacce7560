"""The epsilon-greedy schedule, shared by both learner backends (no torch import)."""

from __future__ import annotations


def linear_epsilon(step: int, initial: float, final: float, decay_steps: int) -> float:
    """Epsilon after ``step`` env steps: linear from ``initial`` to ``final``, then flat."""
    if decay_steps <= 0 or step >= decay_steps:
        return final
    return initial + (final - initial) * (step / decay_steps)
