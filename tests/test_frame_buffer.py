"""The frame replay buffer: each frame stored once, stacks rebuilt exactly, memory stated
and limited, and a device with stacked frames resumes from its saved state."""

import importlib.util
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.envs import EnvSpec
from fedq.common.frame_buffer import (
    FrameReplayBuffer,
    check_buffer_memory,
    replay_buffer_bytes,
    replay_buffer_for,
)
from fedq.common.replay_buffer import ReplayBuffer
from fedq.common.trainer import LocalTrainer

K, H = 4, 6


def _spec(shape, dtype=np.uint8) -> EnvSpec:
    space = gym.spaces.Box(0, 255, shape, dtype)
    return EnvSpec(int(np.prod(shape)), 5, shape, np.dtype(dtype), space)


def _episode(buf, start: int, length: int, stacks: list):
    """Feed an episode whose frame t is all t (as FrameStackObservation stacks them:
    the reset frame repeated), remembering each transition's (obs, next_obs)."""
    frames = [np.full((H, H), start + t, np.uint8) for t in range(length + 1)]

    def stack(t):
        return np.stack([frames[max(0, t - K + 1 + j)] for j in range(K)])

    obs = stack(0)
    for t in range(length):
        next_obs = stack(t + 1)
        buf.add(obs, t % 5, float(t), next_obs, t == length - 1)
        stacks.append((obs, next_obs))
        obs = next_obs


def test_each_frame_is_stored_once_and_batches_rebuild_the_stacks():
    buf = FrameReplayBuffer(100, (K, H, H), batch_size=32, seed=0)
    stacks: list = []
    _episode(buf, 0, 30, stacks)
    _episode(buf, 100, 20, stacks)
    assert buf.frames_written == (K + 30) + (K + 20)  # k at each episode start, then one
    obs, _, rewards, next_obs, _ = buf.gather_arrays(np.arange(len(buf)))
    for i, (o, n) in enumerate(stacks):
        np.testing.assert_array_equal(obs[i], o)
        np.testing.assert_array_equal(next_obs[i], n)
    buf.sample()
    b_obs, _, b_rewards, b_next, _ = buf.batch_arrays()
    assert b_obs.dtype == np.uint8 and b_obs.shape == (32, K, H, H)
    for row in range(32):  # every sampled row is one stored transition
        i = next(i for i, (o, n) in enumerate(stacks)
                 if np.array_equal(o, b_obs[row]) and np.array_equal(n, b_next[row]))
        assert b_rewards[row, 0] == rewards[i, 0]


def test_short_episodes_drop_the_oldest_transitions_never_corrupt_stacks():
    buf = FrameReplayBuffer(20, (K, H, H), batch_size=8, seed=0)
    stacks: list = []
    for e in range(15):  # 2-step episodes: 6 frames per 2 transitions, more than the ring
        _episode(buf, 10 * e, 2, stacks)
    assert 0 < len(buf) <= 20
    obs, _, _, next_obs, _ = buf.gather_arrays(np.arange(len(buf)))
    for i, (o, n) in enumerate(stacks[-len(buf):]):
        np.testing.assert_array_equal(obs[i], o)
        np.testing.assert_array_equal(next_obs[i], n)


def test_memory_is_stated_exactly_and_a_100k_buffer_of_84x84_frames_needs_under_1_gib():
    config = FedqConfig(buffer_size=1000, obs_frame_stack=K)
    spec = _spec((K, 84, 84))
    assert replay_buffer_bytes(config, spec) == replay_buffer_for(config, spec, 0).nbytes
    flat = replace(config, obs_frame_stack=1)
    spec1 = _spec((84, 84))
    assert replay_buffer_bytes(flat, spec1) == replay_buffer_for(flat, spec1, 0).nbytes
    big = replay_buffer_bytes(replace(config, buffer_size=100_000), spec)
    stacked_twice = 100_000 * 2 * K * 84 * 84
    assert big < 2**30 and big < stacked_twice / 6


def test_a_frame_stack_over_the_memory_limit_is_refused_naming_the_field():
    config = FedqConfig(buffer_size=100_000, obs_frame_stack=K, buffer_memory_mb=512.0)
    with pytest.raises(ConfigError, match=r"'buffer-memory-mb'.*obs-frame-stack 4 frames.*"
                                          r"need 849 MiB"):
        check_buffer_memory(config, _spec((K, 84, 84)))
    check_buffer_memory(replace(config, buffer_memory_mb=1024.0), _spec((K, 84, 84)))


def test_save_and_load_restore_transitions_and_the_sampling_draws(tmp_path):
    buf = FrameReplayBuffer(40, (K, H, H), batch_size=16, seed=5)
    stacks: list = []
    for e in range(4):
        _episode(buf, 20 * e, 13, stacks)  # 52 transitions: wrapped
    buf.save(tmp_path / "buf.npz")
    restored = FrameReplayBuffer(40, (K, H, H), batch_size=16, seed=99)
    restored.load(tmp_path / "buf.npz")
    assert len(restored) == len(buf) == 40
    assert restored.frames_written < buf.frames_written  # only the frames still needed
    buf.sample()
    restored.sample()
    for a, b in zip(buf.batch_arrays(), restored.batch_arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    smaller = FrameReplayBuffer(10, (K, H, H), batch_size=4, seed=0)
    smaller.load(tmp_path / "buf.npz")  # keeps the newest
    np.testing.assert_array_equal(smaller.gather_arrays(np.arange(10))[0],
                                  np.stack([o for o, _ in stacks[-10:]]))
    with pytest.raises(ValueError, match="not a frame replay buffer"):
        ReplayBuffer(5, 3, 2, 0).save(tmp_path / "flat.npz")
        restored.load(tmp_path / "flat.npz")


@pytest.mark.skipif(importlib.util.find_spec("Box2D") is None, reason="needs fedq[pixels]")
def test_a_device_with_stacked_frames_resumes_from_its_saved_state(tmp_path):
    config = FedqConfig.from_mapping({
        "env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}', "network": "edge-cnn",
        "obs-grayscale": True, "obs-resize": 24, "obs-frame-stack": K, "buffer-size": 200,
        "batch-size": 8, "learning-starts": 20, "target-update-interval": 10})
    device = LocalTrainer(config, seed=1)
    device.train(30)
    assert isinstance(device.buffer, FrameReplayBuffer) and device.buffer.obs_dtype == np.uint8
    device.save(tmp_path)
    resumed = LocalTrainer(config, seed=1)
    assert resumed.load(tmp_path)
    assert resumed.counters == device.counters and len(resumed.buffer) == 30
    for name, value in device.learner.online_arrays().items():
        np.testing.assert_array_equal(resumed.learner.online_arrays()[name], value)
    device.buffer.sample()
    resumed.buffer.sample()
    for a, b in zip(device.buffer.batch_arrays(), resumed.buffer.batch_arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    stats = resumed.train(5)
    assert stats.updates == 5 and np.isfinite(stats.mean_loss)
    device.close()
    resumed.close()
