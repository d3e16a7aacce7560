"""A numpy ring buffer of transitions, with sampling that allocates nothing per step.

Sampling writes into preallocated batch arrays (:meth:`ReplayBuffer.batch_arrays`);
:meth:`ReplayBuffer.batch_tensors` exposes torch views of those same arrays, so a DQN
update reads the freshly sampled batch without copying or allocating tensors.
Observations keep their shape and their dtype when it is uint8 (camera frames: a quarter
of float32's memory; the CNNs scale them), other observations are stored as float32. Torch is
imported only by the torch views: the numpy backend's devices do not have it. The
buffer saves to and loads from one ``.npz`` file so a device's experience survives
restarts.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedq.common.atomic import PRIVATE, atomic_open

if TYPE_CHECKING:
    import torch

_FORMAT_VERSION = 1


class BatchArrays:
    """What every replay buffer shares: the batch arrays its ``sample`` refills in place
    (allocated once, so sampling allocates nothing per step) and their torch views. A
    subclass sets ``obs_shape`` and ``obs_dtype``, calls :meth:`_allocate_batch` and
    defines ``sample`` and ``gather_arrays``."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype

    def _allocate_batch(self, batch_size: int) -> None:
        self._idx = np.empty(batch_size, dtype=np.int64)
        self._b_obs = np.empty((batch_size, *self.obs_shape), dtype=self.obs_dtype)
        self._b_next_obs = np.empty((batch_size, *self.obs_shape), dtype=self.obs_dtype)
        self._b_actions = np.empty((batch_size, 1), dtype=np.int64)
        self._b_rewards = np.empty((batch_size, 1), dtype=np.float32)
        self._b_terminated = np.empty((batch_size, 1), dtype=np.float32)

    def gather_arrays(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """:meth:`gather_arrays` as tensors."""
        import torch

        return tuple(torch.from_numpy(a) for a in self.gather_arrays(indices))

    def batch_arrays(self) -> tuple[np.ndarray, ...]:
        """The preallocated batch arrays every :meth:`sample` refills: obs ``(B, *obs_shape)``,
        actions ``(B, 1)`` int64, rewards, next_obs, terminated (``(B, 1)`` float32)."""
        return (self._b_obs, self._b_actions, self._b_rewards, self._b_next_obs,
                self._b_terminated)

    def batch_tensors(self) -> tuple[torch.Tensor, ...]:
        """Torch views (shared memory) of :meth:`batch_arrays`. Call once; every
        :meth:`sample` refreshes their contents in place."""
        import torch

        return tuple(torch.from_numpy(a) for a in self.batch_arrays())


class ReplayBuffer(BatchArrays):
    """Fixed-capacity FIFO store of (obs, action, reward, next_obs, terminated).

    ``terminated`` is stored, not ``done``: a transition cut off by a time limit
    (truncation) keeps bootstrapping from its next observation.
    """

    def __init__(self, capacity: int, obs_shape: int | tuple[int, ...], batch_size: int,
                 seed: int, obs_dtype: np.dtype | type = np.float32) -> None:
        """``obs_shape``: one observation's shape (an int ``n``: ``(n,)``); ``obs_dtype``:
        the env's, stored as is when uint8, as float32 otherwise."""
        obs_shape = (obs_shape,) if isinstance(obs_shape, int | np.integer) else obs_shape
        self.obs_shape = tuple(int(d) for d in obs_shape)
        if capacity < 1 or batch_size < 1 or min(self.obs_shape, default=0) < 1:
            raise ValueError("capacity, batch_size and each observation dimension must be >= 1")
        self.capacity = capacity
        self.obs_dtype = np.dtype(np.uint8 if np.dtype(obs_dtype) == np.uint8 else np.float32)
        self.batch_size = batch_size
        self._allocate_observations()
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)
        self._allocate_batch(batch_size)

    def _allocate_observations(self) -> None:
        shape = (self.capacity, *self.obs_shape)
        self.obs = np.zeros(shape, dtype=self.obs_dtype)
        self.next_obs = np.zeros(shape, dtype=self.obs_dtype)

    @property
    def nbytes(self) -> int:
        """Memory of the stored transitions (batch arrays not counted)."""
        return sum(a.nbytes for a in (self.obs, self.next_obs, self.actions, self.rewards,
                                      self.terminated))

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray,
            terminated: bool) -> None:
        """Store one transition, overwriting the oldest once full."""
        i = self.pos
        self.obs[i] = obs.reshape(self.obs_shape)
        self.next_obs[i] = next_obs.reshape(self.obs_shape)
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.pos = (i + 1) % self.capacity
        if self.size < self.capacity:
            self.size += 1

    def sample(self) -> None:
        """Draw ``batch_size`` transitions uniformly (with replacement) into the batch arrays."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = self._idx
        idx[:] = self.rng.integers(0, self.size, size=self.batch_size)
        np.take(self.obs, idx, axis=0, out=self._b_obs)
        np.take(self.next_obs, idx, axis=0, out=self._b_next_obs)
        np.take(self.actions, idx, out=self._b_actions[:, 0])
        np.take(self.rewards, idx, out=self._b_rewards[:, 0])
        np.take(self.terminated, idx, out=self._b_terminated[:, 0])

    def gather_arrays(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        """New arrays of the transitions at ``indices``, in :meth:`batch_arrays`' order and
        shapes, for batches whose size varies (DP-SGD's Poisson sampling)."""
        return (self.obs[indices], self.actions[indices, None], self.rewards[indices, None],
                self.next_obs[indices], self.terminated[indices, None])

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename) so a crash never leaves a torn buffer."""
        n = self.size
        with atomic_open(path, permissions=PRIVATE) as fh:
            np.savez(fh, version=_FORMAT_VERSION, capacity=self.capacity, pos=self.pos,
                     obs=self.obs[:n], next_obs=self.next_obs[:n], actions=self.actions[:n],
                     rewards=self.rewards[:n], terminated=self.terminated[:n],
                     rng_state=np.frombuffer(
                         repr(self.rng.bit_generator.state).encode(), dtype=np.uint8))

    def load(self, path: Path) -> None:
        """Restore contents, write position and sampling RNG exactly (same capacity), or
        keep the newest transitions if the capacity changed."""
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported replay buffer format {data['version']}")
            if data["obs"].shape[1:] != self.obs_shape:
                raise ValueError(f"{path}: stored observations have shape "
                                 f"{data['obs'].shape[1:]}, expected {self.obs_shape}")
            stored, pos = len(data["actions"]), int(data["pos"])
            same_layout = int(data["capacity"]) == self.capacity
            wrapped = stored == int(data["capacity"])
            order = (np.arange(pos - stored, pos) % stored if wrapped and not same_layout
                     else np.arange(stored))  # oldest first, unless the layout is kept
            n = min(stored, self.capacity)
            for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
                getattr(self, name)[:n] = data[name][order[-n:]]
            state = bytes(data["rng_state"]).decode()
        self.size = n
        self.pos = pos % self.capacity if same_layout else n % self.capacity
        # repr() of a bit-generator state is a dict of str/int literals only
        self.rng.bit_generator.state = ast.literal_eval(state)
