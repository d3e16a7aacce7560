"""Play episodes with any ``act(obs) -> int`` policy, with no torch import.

The one episode loop shared by greedy evaluation (a device's federated evaluation and
:meth:`common.trainer.LocalTrainer.evaluate`), the on-device runner (greedy or
epsilon-greedy control, optionally recording transitions), the exporter (gathering
teacher states to fine-tune and distil on) and the export benchmark (greedy returns of
every format), so all of them score a policy the same way: episode ``k`` starts from
``env.reset(seed=seed + k)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedq.common.envs import ImageObs, make_env

Act = Callable[[np.ndarray], int]
OnTransition = Callable[[np.ndarray, int, float, np.ndarray, bool], None]


def play_episodes(act: Act, env_id: str, episodes: int, *, seed: int = 0,
                  env_kwargs: dict[str, Any] | None = None,
                  env_physics: dict[str, float] | None = None, epsilon: float = 0.0,
                  on_transition: OnTransition | None = None,
                  image: ImageObs | None = None, action_repeat: int = 1) -> list[float]:
    """Returns of ``episodes`` episodes on a fresh env (``env_physics``: a device's
    physics overrides; ``image``: the run's image preprocessing); with ``epsilon`` > 0 a
    uniformly random action replaces the policy's with that probability (exploration
    while deployed); ``action_repeat``: the run's, so a policy plays as it trained)."""
    env = make_env(env_id, env_kwargs, env_physics, image, action_repeat)
    rng = np.random.default_rng(seed)
    n_actions = int(env.action_space.n)
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                action = (int(rng.integers(n_actions)) if epsilon and rng.random() < epsilon
                          else act(obs))
                next_obs, reward, terminated, truncated, _ = env.step(action)
                if on_transition is not None:
                    on_transition(obs, action, float(reward), next_obs, bool(terminated))
                total += float(reward)
                done = terminated or truncated
                obs = next_obs
            returns.append(total)
    finally:
        env.close()
    return returns


def collect_states(act: Act, env_id: str, n_states: int, *, seed: int = 0,
                   env_kwargs: dict[str, Any] | None = None, epsilon: float = 0.1
                   ) -> np.ndarray:
    """``n_states`` observations visited by ``act`` acting epsilon-greedily.

    A little exploration widens the states a student or pruned network is trained on
    beyond the teacher's narrow greedy path, so small deviations at deployment do not
    lead it into states it never saw a target for.
    """
    states: list[np.ndarray] = []
    episode = 0
    while len(states) < n_states:
        play_episodes(act, env_id, 1, seed=seed + episode, env_kwargs=env_kwargs,
                      epsilon=epsilon,
                      on_transition=lambda obs, *_: states.append(
                          np.asarray(obs, dtype=np.float32).reshape(-1)))
        episode += 1
    return np.stack(states[:n_states])
