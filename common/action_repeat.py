"""``action-repeat``: each decision plays N env steps and sums their rewards (frame-skip).

Gymnasium's ``RepeatAction`` does this for any env. CarRacing draws its observation
inside every ``step`` (``_render("state_pixels")``, some 80% of a step on this CPU), and
the frames of all but the last repeated step are thrown away unseen; :class:`DrawLastRepeat`
skips drawing them. Physics, rewards and termination are untouched (drawing reads the
world, never writes it), so it returns the same observations and rewards as
``RepeatAction`` (``tests/test_action_repeat.py`` checks this frame for frame).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

DRAWS_IN_STEP = ("CarRacing",)
"""Unwrapped env classes that draw their observation in ``step`` with ``_render``."""


class DrawLastRepeat(gym.Wrapper):
    """``RepeatAction`` for an env that draws its observation in ``step``: the repeated
    steps before the last reuse the previous frame instead of drawing a new one."""

    def __init__(self, env: gym.Env, num_repeats: int) -> None:
        super().__init__(env)
        self.num_repeats = num_repeats

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        base = self.env.unwrapped
        total = 0.0
        for i in range(self.num_repeats):
            last = i == self.num_repeats - 1
            if not last:  # an instance attribute shadows the method for this one step
                # a copy: gymnasium's env checker warns of frames shared between steps
                base._render = lambda *_args, **_kwargs: base.state.copy()
            try:
                obs, reward, terminated, truncated, info = self.env.step(action)
            finally:
                if not last:
                    del base._render
            total += float(reward)
            if terminated or truncated:
                if not last:  # the episode's final frame is seen: draw it
                    obs = base.state = base._render("state_pixels")
                break
        return obs, total, terminated, truncated, info


def repeat_actions(env: gym.Env, num_repeats: int) -> gym.Env:
    """``env`` with each action played ``num_repeats`` times (1: ``env`` itself)."""
    if num_repeats == 1:
        return env
    if (type(env.unwrapped).__name__ in DRAWS_IN_STEP
            and getattr(env.unwrapped, "render_mode", None) != "human"):
        return DrawLastRepeat(env, num_repeats)
    return gym.wrappers.RepeatAction(env, num_repeats)
