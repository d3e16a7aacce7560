"""A replay buffer for stacked camera frames that stores each frame once, and the choice
of buffer (and its memory) for a run.

With ``obs-frame-stack = k`` every observation is the last k frames, and a transition's
next observation shares k - 1 of them with its observation, which shares k - 1 with the
previous transition's. :class:`FrameReplayBuffer` keeps one ring of single frames and, per
transition, the ids of the k frames of its observation and of its next observation:
one new frame per env step (k at an episode start), so 100k transitions of 4 x 84 x 84
uint8 frames take ~0.8 GiB instead of 5.3 GiB (obs and next_obs stacks stored apart) or
21 GiB (float32). Batches are gathered into the same preallocated ``(B, k, H, W)`` uint8
arrays as :class:`common.replay_buffer.ReplayBuffer`'s, so the learners do not know which
buffer they read.

The frame ring has ``FRAME_HEADROOM`` more slots than transitions, for the extra frames of
episode starts. Only when episodes are so short that the ring would overwrite a frame a
stored transition still needs does the buffer drop its oldest transitions early (it then
holds fewer than ``capacity``); CarRacing's 1000-step episodes never come close.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedq.common.atomic import PRIVATE, atomic_open
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.network_registry import IMAGE
from fedq.common.replay_buffer import BatchArrays, ReplayBuffer

if TYPE_CHECKING:
    from fedq.common.envs import EnvSpec

_FORMAT_VERSION = 1
FRAME_HEADROOM = 0.25  # frame slots beyond one per transition, as a share of capacity


def frame_slots(capacity: int, frame_stack: int) -> int:
    """Frames a :class:`FrameReplayBuffer` of ``capacity`` transitions keeps."""
    return capacity + int(capacity * FRAME_HEADROOM) + 2 * frame_stack


class FrameReplayBuffer(BatchArrays):
    """Fixed-capacity FIFO of transitions over stacked frames, each frame stored once."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], batch_size: int,
                 seed: int, obs_dtype: np.dtype | type = np.uint8) -> None:
        """``obs_shape``: ``(k, *frame_shape)``, the frame stack's."""
        if capacity < 1 or batch_size < 1 or len(obs_shape) < 2 or min(obs_shape) < 1:
            raise ValueError("capacity and batch_size must be >= 1, obs_shape (k, *frame)")
        self.capacity = capacity
        self.batch_size = batch_size
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        self.stack = self.obs_shape[0]
        self.frame_capacity = frame_slots(capacity, self.stack)
        self.frames = np.zeros((self.frame_capacity, *self.obs_shape[1:]), self.obs_dtype)
        # global frame ids (frame id g lives in slot g % frame_capacity)
        self.obs_ids = np.zeros((capacity, self.stack), dtype=np.int64)
        self.next_ids = np.zeros((capacity, self.stack), dtype=np.int64)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self.frames_written = 0
        self.rng = np.random.default_rng(seed)
        self._last_next: np.ndarray | None = None
        self._last_next_ids = np.zeros(self.stack, dtype=np.int64)
        self._allocate_batch(batch_size)

    @property
    def nbytes(self) -> int:
        """Memory of the stored frames and transitions (batch arrays not counted)."""
        return sum(a.nbytes for a in (self.frames, self.obs_ids, self.next_ids, self.actions,
                                      self.rewards, self.terminated))

    def __len__(self) -> int:
        return self.size

    def _oldest(self) -> int:
        return (self.pos - self.size) % self.capacity

    def _write_frame(self, frame: np.ndarray) -> int:
        """Store one frame, first dropping transitions that still need the one it
        overwrites; returns its global id."""
        g = self.frames_written
        while self.size and self.obs_ids[self._oldest(), 0] <= g - self.frame_capacity:
            self.size -= 1
        self.frames[g % self.frame_capacity] = frame
        self.frames_written = g + 1
        return g

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray,
            terminated: bool) -> None:
        """Store one transition: only ``next_obs``'s newest frame when ``obs`` is the
        previous transition's ``next_obs`` (the same episode), all k frames of ``obs``
        too otherwise (an episode start)."""
        if self._last_next is not None and np.array_equal(obs, self._last_next):
            ids = self._last_next_ids.copy()
        else:
            ids = np.array([self._write_frame(frame) for frame in obs], dtype=np.int64)
        newest = self._write_frame(next_obs[-1])
        i = self.pos
        self.obs_ids[i] = ids
        self.next_ids[i, :-1] = ids[1:]
        self.next_ids[i, -1] = newest
        self.actions[i] = action
        self.rewards[i] = reward
        self.terminated[i] = terminated
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self._last_next = np.array(next_obs, dtype=self.obs_dtype)
        self._last_next_ids[:] = self.next_ids[i]

    def _slots(self, indices: np.ndarray) -> np.ndarray:
        """Ring slots of the transitions at ``indices`` (0 = the oldest stored)."""
        return (self.pos - self.size + indices) % self.capacity

    def sample(self) -> None:
        """Draw ``batch_size`` transitions uniformly (with replacement) into the batch
        arrays; the same draws as :class:`ReplayBuffer` (index r: the r-th oldest)."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = self._idx
        idx[:] = self._slots(self.rng.integers(0, self.size, size=self.batch_size))
        f = self.frame_capacity
        np.take(self.frames, self.obs_ids[idx] % f, axis=0, out=self._b_obs)
        np.take(self.frames, self.next_ids[idx] % f, axis=0, out=self._b_next_obs)
        np.take(self.actions, idx, out=self._b_actions[:, 0])
        np.take(self.rewards, idx, out=self._b_rewards[:, 0])
        np.take(self.terminated, idx, out=self._b_terminated[:, 0])

    def gather_arrays(self, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        """New arrays of the transitions at ``indices`` (0 = oldest), in
        :meth:`batch_arrays`' order and shapes (DP-SGD's Poisson batches)."""
        slots, f = self._slots(np.asarray(indices, dtype=np.int64)), self.frame_capacity
        return (self.frames[self.obs_ids[slots] % f], self.actions[slots, None],
                self.rewards[slots, None], self.frames[self.next_ids[slots] % f],
                self.terminated[slots, None])

    def save(self, path: Path) -> None:
        """Write atomically the frames the stored transitions use (each once) and their
        frame ids, oldest transition first, with the sampling RNG."""
        slots = self._slots(np.arange(self.size))
        low = int(self.obs_ids[slots, 0].min()) if self.size else self.frames_written
        frame_ids = np.arange(low, self.frames_written)
        with atomic_open(path, permissions=PRIVATE) as fh:
            np.savez(fh, version=_FORMAT_VERSION, kind="frames",
                     frames=self.frames[frame_ids % self.frame_capacity],
                     obs_ids=self.obs_ids[slots] - low, next_ids=self.next_ids[slots] - low,
                     actions=self.actions[slots], rewards=self.rewards[slots],
                     terminated=self.terminated[slots],
                     rng_state=np.frombuffer(
                         repr(self.rng.bit_generator.state).encode(), dtype=np.uint8))

    def load(self, path: Path) -> None:
        """Restore the newest ``capacity`` stored transitions (all, if they fit) and the
        sampling RNG: sampling then draws what it would have drawn without the restart."""
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _FORMAT_VERSION or "frames" not in data.files:
                raise ValueError(f"{path}: not a frame replay buffer of format "
                                 f"{_FORMAT_VERSION}")
            frames = data["frames"]
            if frames.shape[1:] != self.obs_shape[1:] or data["obs_ids"].shape[1:] != (
                    self.stack,):
                raise ValueError(f"{path}: stored frames {frames.shape[1:]} stacked "
                                 f"{data['obs_ids'].shape[1:]}, expected {self.obs_shape}")
            obs_ids, next_ids = data["obs_ids"], data["next_ids"]
            actions, rewards, terminated = data["actions"], data["rewards"], data["terminated"]
            state = bytes(data["rng_state"]).decode()
        self.pos = self.size = self.frames_written = 0
        self._last_next = None
        for t in range(max(0, len(actions) - self.capacity), len(actions)):
            self.add(frames[obs_ids[t]], int(actions[t]), float(rewards[t]),
                     frames[next_ids[t]], bool(terminated[t]))
        # repr() of a bit-generator state is a dict of str/int literals only
        self.rng.bit_generator.state = ast.literal_eval(state)


def uses_frame_buffer(config: FedqConfig, spec: EnvSpec) -> bool:
    """Stacked image frames go to a :class:`FrameReplayBuffer`, the rest to a
    :class:`common.replay_buffer.ReplayBuffer`."""
    return spec.obs_kind == IMAGE and config.obs_frame_stack > 1


def replay_buffer_bytes(config: FedqConfig, spec: EnvSpec) -> int:
    """Memory the run's replay buffer will allocate on a device with ``spec``'s env."""
    n = config.buffer_size
    if uses_frame_buffer(config, spec):
        frame = int(np.prod(spec.obs_shape[1:])) * spec.obs_dtype.itemsize
        # per transition: 2 x k int64 frame ids, action, reward, terminated
        return frame_slots(n, spec.obs_shape[0]) * frame + n * (16 * spec.obs_shape[0] + 16)
    itemsize = 1 if spec.obs_dtype == np.uint8 else 4
    return n * (2 * spec.obs_dim * itemsize + 8 + 4 + 4)


def check_buffer_memory(config: FedqConfig, spec: EnvSpec) -> None:
    """Refuse a run whose replay buffer would exceed ``buffer-memory-mb``, naming it."""
    need = replay_buffer_bytes(config, spec)
    limit = config.buffer_memory_mb * 2**20
    if need <= limit:
        return
    stack = (f" of obs-frame-stack {config.obs_frame_stack} frames (each frame stored once)"
             if uses_frame_buffer(config, spec) else "")
    raise ConfigError("buffer-memory-mb", f"buffer-size {config.buffer_size} transitions"
                      f"{stack} of observations {spec.obs_shape} {spec.obs_dtype} need "
                      f"{need / 2**20:.0f} MiB, more than buffer-memory-mb "
                      f"{config.buffer_memory_mb:g}: lower buffer-size, obs-frame-stack or "
                      "obs-resize, set obs-grayscale, or raise buffer-memory-mb")


def replay_buffer_for(config: FedqConfig, spec: EnvSpec, seed: int
                      ) -> ReplayBuffer | FrameReplayBuffer:
    """The run's replay buffer for ``spec``'s observations."""
    kind = FrameReplayBuffer if uses_frame_buffer(config, spec) else ReplayBuffer
    return kind(config.buffer_size, spec.obs_shape, config.batch_size, seed, spec.obs_dtype)
