"""The range of every discounted return an env can produce, for ``td-target-clip``.

With per-step rewards in ``[r_min, r_max]`` every discounted return lies in
``[min(r_min, r_min / (1 - gamma)), max(r_max, r_max / (1 - gamma))]`` (one step, or
infinitely many), so no true Q-value leaves it and a TD target outside it is an
overestimate the bootstrap would feed back. Issue 20 measured exactly that on CartPole:
after solving, max Q climbed past the bound of 100 to ~7,000 and the policy collapsed.

Only envs with a known per-step reward range are listed; gymnasium 1.x no longer carries
``reward_range`` on its envs. No fedq imports: the config validates against this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# env id -> (r_min, r_max) of one step's reward, as gymnasium's sources define them
REWARD_RANGES: dict[str, tuple[float, float]] = {
    "CartPole-v0": (1.0, 1.0),
    "CartPole-v1": (1.0, 1.0),
    "Acrobot-v1": (-1.0, 0.0),
    "MountainCar-v0": (-1.0, -1.0),
}
# CartPole's sutton_barto_reward=True gives 0 per step and -1 on the terminating one
_SUTTON_BARTO = (-1.0, 0.0)


def reward_range(env_id: str, env_kwargs: Mapping[str, Any] | None = None
                 ) -> tuple[float, float] | None:
    """One step's reward range of ``env_id`` made with ``env_kwargs``; None if unknown."""
    if env_id.startswith("CartPole-") and (env_kwargs or {}).get("sutton_barto_reward"):
        return _SUTTON_BARTO
    return REWARD_RANGES.get(env_id)


def return_bounds(env_id: str, env_kwargs: Mapping[str, Any] | None, gamma: float
                  ) -> tuple[float, float] | None:
    """``(low, high)`` of every discounted return of the env; None if its rewards are
    not in :data:`REWARD_RANGES`."""
    rewards = reward_range(env_id, env_kwargs)
    if rewards is None:
        return None
    r_min, r_max = rewards
    horizon = 1.0 / (1.0 - gamma) if gamma < 1.0 else float("inf")

    def forever(r: float) -> float:  # r every step without end (0 stays 0 at gamma 1)
        return r * horizon if r else 0.0

    return min(r_min, forever(r_min)), max(r_max, forever(r_max))
