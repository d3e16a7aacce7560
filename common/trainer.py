"""The local DQN loop on one device: act, step the env, store, update, sync the target.

:class:`LocalTrainer` is what a Flower client runs each round and what the single-agent
benchmarks run directly. Its whole learning state (networks, optimizer, replay buffer,
step counters, RNGs and, with DP, the privacy ledger of :mod:`common.privacy`) saves to
a directory and loads back, so a device that restarts continues exactly where its last
completed round left it (with DP, up to the noise and batch draws, which come from OS
entropy on purpose) and its epsilon keeps adding up.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedq.common.atomic import PRIVATE, atomic_open, atomic_write_text
from fedq.common.config import FedqConfig
from fedq.common.envs import ImageObs, check_spaces, make_env
from fedq.common.exploration import linear_epsilon
from fedq.common.frame_buffer import replay_buffer_for
from fedq.common.learners import STATE_FILES, check_state_backend, make_learner
from fedq.common.privacy import DevicePrivacy, PrivacyReport
from fedq.common.rollouts import play_episodes
from fedq.common.state_store import DeviceStateError, new_generation, resolve

PROGRESS_EVERY = 1000  # env steps between calls of train()'s progress callback
STOP_CHECK_EVERY = 20  # env steps between polls of train()'s should_stop
_BUFFER_FILE = "replay_buffer.npz"
_COUNTERS_FILE = "counters.json"
_PRIVACY_FILE = "privacy.json"
_RESIDUAL_FILE = "update_residual.npz"


@dataclass
class Counters:
    """Lifetime totals of a device, persisted with its state."""

    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    rounds: int = 0


@dataclass
class TrainStats:
    """What one :meth:`LocalTrainer.train` call did (all scalars leave the device)."""

    env_steps: int
    updates: int
    mean_loss: float
    episode_returns: list[float] = field(default_factory=list)
    epsilon: float = 0.0
    seconds: float = 0.0
    privacy: PrivacyReport | None = None  # with dp-enabled


class LocalTrainer:
    """One device's DQN: its env, replay buffer, learner and counters."""

    def __init__(self, config: FedqConfig, seed: int,
                 min_noise_multiplier: float = 0.0) -> None:
        """``min_noise_multiplier``: the device's privacy-policy floor for DP-SGD noise
        (:class:`common.privacy.DevicePrivacy` refuses a round below it)."""
        self.config = config
        self.seed = seed
        self.env = make_env(config.env_id, config.env_kwargs, config.env_physics,
                            ImageObs.of(config), config.action_repeat)
        spec = check_spaces(config.env_id, self.env)
        self.privacy = (DevicePrivacy(config, min_noise_multiplier) if config.dp_enabled
                        else None)
        # a ledger loaded while DP is off: saved again unchanged, never dropped
        self._kept_ledger: str | None = None
        self.learner = make_learner(spec.observation_space, spec.n_actions, config,
                                    self.privacy, seed)
        self.buffer = replay_buffer_for(config, spec, seed)
        self.learner.bind(self.buffer)
        self.counters = Counters()
        self.rng = random.Random(seed)
        self.n_actions = spec.n_actions
        self._obs: np.ndarray | None = None
        self._episode_return = 0.0
        # error-feedback residual of compressed updates (common/compression.py)
        self.update_residual: dict[str, np.ndarray] = {}

    def epsilon(self, exploration_step: int | None = None) -> float:
        """Epsilon at ``exploration_step`` of the schedule (default: the device's own
        lifetime env steps)."""
        c = self.config
        step = self.counters.env_steps if exploration_step is None else exploration_step
        return linear_epsilon(step, c.exploration_initial_eps, c.exploration_final_eps,
                              c.exploration_steps)

    def train(self, n_steps: int, exploration_start: int | None = None,
              progress: Callable[[int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> TrainStats:
        """Run ``n_steps`` env steps with epsilon-greedy acting and DQN updates.

        The epsilon schedule starts at ``exploration_start`` (``exploration-clock =
        "federation"``: the env steps already in the global model) and advances one per
        env step; by default it counts the device's own lifetime env steps. The
        learning-rate decay always counts the device's own steps: its horizon is a budget
        per device, which the federation clock would use up N times faster on N devices
        (docs/running.md#how-a-round-works, "Exploration clock").
        ``progress`` is called with the steps done so far every ``PROGRESS_EVERY`` steps,
        so a long round can report how it is going. ``should_stop`` (polled every
        ``STOP_CHECK_EVERY`` steps) ends the round early, between two steps, with
        everything consistent (:mod:`client.round_watch`); the stats count the steps done.
        With DP, raises :class:`common.privacy.PrivacyBudgetExhausted` before any step
        if the round's updates would take the device past ``dp-target-epsilon``.
        """
        if exploration_start is not None and exploration_start < 0:
            raise ValueError(f"exploration_start must be >= 0, got {exploration_start}")
        if self.privacy is not None:
            self.privacy.begin_round(self.planned_update_buffer_lengths(n_steps),
                                     self._buffer_lengths_of_next_updates)
        c, counters, env, buffer, learner = (
            self.config, self.counters, self.env, self.buffer, self.learner)
        rng_random, policy_act, n_actions = self.rng.random, learner.policy.act, self.n_actions
        eps_start, eps_end, eps_steps = (
            c.exploration_initial_eps, c.exploration_final_eps, c.exploration_steps)
        lr_decay = c.learning_rate_decay_steps > 0  # off: the learner's lr is never touched
        start_time = time.perf_counter()
        returns: list[float] = []
        loss_sum, n_updates = 0.0, 0
        if self._obs is None:
            self._obs, _ = env.reset(seed=self.seed + counters.episodes)
            self._episode_return = 0.0
        obs, episode_return = self._obs, self._episode_return
        step = counters.env_steps
        # schedule position minus device step: 0 on the device's own clock
        clock_offset = 0 if exploration_start is None else exploration_start - step
        for _ in range(n_steps):
            if rng_random() < linear_epsilon(step + clock_offset, eps_start, eps_end,
                                             eps_steps):
                action = int(rng_random() * n_actions)
            else:
                action = policy_act(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, float(reward), next_obs, terminated)
            episode_return += float(reward)
            step += 1
            if terminated or truncated:
                returns.append(episode_return)
                counters.episodes += 1
                obs, _ = env.reset()
                episode_return = 0.0
            else:
                obs = next_obs
            if step > c.learning_starts and step % c.train_frequency == 0:
                if lr_decay:  # a per-device budget: the device's own steps, any clock
                    learner.set_learning_rate(linear_epsilon(
                        step, c.learning_rate, c.learning_rate_final,
                        c.learning_rate_decay_steps))
                for _ in range(c.gradient_steps):
                    loss_sum += learner.update()
                    n_updates += 1
            if step % c.target_update_interval == 0:
                learner.sync_target()
            if progress is not None and step % PROGRESS_EVERY == 0:
                progress(step - counters.env_steps)
            if should_stop is not None and step % STOP_CHECK_EVERY == 0 and should_stop():
                break
        done = step - counters.env_steps
        self._obs, self._episode_return = obs, episode_return
        counters.env_steps = step
        counters.updates += n_updates
        return TrainStats(env_steps=done, updates=n_updates,
                          mean_loss=loss_sum / n_updates if n_updates else float("nan"),
                          episode_returns=returns, epsilon=self.epsilon(step + clock_offset),
                          seconds=time.perf_counter() - start_time,
                          privacy=self.privacy.report() if self.privacy else None)

    def planned_update_buffer_lengths(self, n_steps: int) -> np.ndarray:
        """The replay buffer's length at each update the next ``n_steps`` env steps make.

        Mirrors :meth:`train`'s update condition (a test holds the two together), so DP
        accounting knows a round's sample rates before the round starts.
        """
        c = self.config
        start = self.counters.env_steps
        steps = np.arange(start + 1, start + n_steps + 1)
        lengths = np.minimum(len(self.buffer) + (steps - start), c.buffer_size)
        updating = (steps > c.learning_starts) & (steps % c.train_frequency == 0)
        return np.repeat(lengths[updating], c.gradient_steps)

    def _buffer_lengths_of_next_updates(self, n_updates: int) -> np.ndarray:
        c = self.config
        update_steps = -(-max(n_updates, 0) // c.gradient_steps)
        n_steps = max(0, c.learning_starts - self.counters.env_steps) + (
            c.train_frequency * update_steps)
        return self.planned_update_buffer_lengths(n_steps)[:max(n_updates, 0)]

    def evaluate(self, n_episodes: int, seed: int | None = None) -> list[float]:
        """Greedy returns over ``n_episodes`` on a separate env instance."""
        c = self.config
        return play_episodes(self.learner.policy.act, c.env_id, n_episodes,
                             seed=(self.seed + 10**6) if seed is None else seed,
                             env_kwargs=c.env_kwargs, env_physics=c.env_physics,
                             image=ImageObs.of(c), action_repeat=c.action_repeat)

    # --- persistence -------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the whole state as a new generation, then flip the ``CURRENT`` pointer.

        :func:`common.state_store.new_generation` writes the generation's manifest after
        every file is on disk and replaces the pointer after that, so a crash at any
        moment leaves the old state or the new one complete, never a mix; files are 0600.
        """
        with new_generation(directory) as target:
            self.learner.save(target, {"python_rng": self.rng.getstate()})
            self.buffer.save(target / _BUFFER_FILE)
            atomic_write_text(target / _COUNTERS_FILE, json.dumps(asdict(self.counters)),
                              permissions=PRIVATE)
            if self.privacy is not None:
                atomic_write_text(target / _PRIVACY_FILE,
                                  json.dumps(self.privacy.state_dict()), permissions=PRIVATE)
            elif self._kept_ledger is not None:
                atomic_write_text(target / _PRIVACY_FILE, self._kept_ledger,
                                  permissions=PRIVATE)
            if self.update_residual:
                with atomic_open(target / _RESIDUAL_FILE, permissions=PRIVATE) as fh:
                    np.savez(fh, **self.update_residual)

    def load(self, directory: Path) -> bool:
        """Restore the state :meth:`save` last completed; False if there is none yet.

        Which generation: :func:`common.state_store.resolve` (the pointer's if intact,
        else the newest complete one). A device with DP, or with a ledger from training
        with DP before, refuses a fallback that would forget privacy budget it spent.
        Every unreadable file raises :class:`common.state_store.DeviceStateError` naming it.
        """
        # DP now, or DP before (a ledger it keeps): a fallback would lose budget spent
        source = resolve(directory, keep_history=(self.privacy is not None
                                                  or has_privacy_ledger(directory)),
                         legacy_files=(STATE_FILES[self.config.backend], _BUFFER_FILE,
                                       _COUNTERS_FILE))
        if source is None:
            return False
        check_state_backend(source, self.config.backend)
        with _named(source / STATE_FILES[self.config.backend]):
            self.rng.setstate(_as_tuples(self.learner.load(source)["python_rng"]))
        with _named(source / _BUFFER_FILE):
            self.buffer.load(source / _BUFFER_FILE)
        with _named(source / _COUNTERS_FILE):
            self.counters = Counters(**json.loads((source / _COUNTERS_FILE).read_text()))
        if self.privacy is not None:
            if (source / _PRIVACY_FILE).exists():  # absent: updates untracked, epsilon inf
                with _named(source / _PRIVACY_FILE):
                    self.privacy.load_state_dict(
                        json.loads((source / _PRIVACY_FILE).read_text()))
            self.privacy.untracked_updates = self.counters.updates - self.privacy.steps
        elif (source / _PRIVACY_FILE).exists():  # DP off this time: keep the ledger
            self._kept_ledger = (source / _PRIVACY_FILE).read_text()
        if (source / _RESIDUAL_FILE).exists():
            with _named(source / _RESIDUAL_FILE), np.load(source / _RESIDUAL_FILE) as residual:
                self.update_residual = {k: residual[k] for k in residual.files}
        self._obs = None
        return True

    def close(self) -> None:
        self.env.close()


def has_privacy_ledger(directory: Path) -> bool:
    """Whether any generation of the device state in ``directory`` holds a privacy
    ledger, i.e. the device has trained with DP at least once (its buffer then holds
    DP-protected transitions). Any generation, not only the pointer's: a damaged pointer
    must not make a private device look non-private."""
    return any(directory.glob(f"gen-*/{_PRIVACY_FILE}"))


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """Turn any failure to read or apply ``path`` into a DeviceStateError naming it.

    Broad on purpose: a damaged file surfaces as whatever its parser raises (BadZipFile,
    UnpicklingError, KeyError, ValueError, RuntimeError, ...), and the device's operator
    needs the file's name, not the parser's internals.
    """
    try:
        yield
    except DeviceStateError:
        raise
    except Exception as err:  # see the docstring
        raise DeviceStateError(f"{path}: cannot load: {type(err).__name__}: "
                               f"{str(err)[:300]}") from err


def _as_tuples(value: object) -> object:
    """``random.setstate`` wants tuples; a torch or JSON round-trip hands back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value
