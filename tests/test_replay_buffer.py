"""The replay buffer keeps the newest transitions, samples only stored ones, and survives
a save/load (the device's experience must outlive a restart)."""

import numpy as np
import pytest

from fedq.common.replay_buffer import ReplayBuffer


def _fill(buf: ReplayBuffer, start: int, n: int) -> None:
    for i in range(start, start + n):
        obs = np.full(buf.obs_shape, i, dtype=np.float32)
        buf.add(obs, i % 2, float(i), obs + 0.5, terminated=(i % 7 == 0))


def test_wraps_around_keeping_the_newest_transitions():
    buf = ReplayBuffer(capacity=5, obs_shape=3, batch_size=4, seed=0)
    _fill(buf, 0, 8)
    assert len(buf) == 5
    assert sorted(buf.rewards.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert buf.pos == 3  # next write overwrites transition 3, the oldest


def test_sample_draws_only_stored_transitions_and_keeps_fields_aligned():
    buf = ReplayBuffer(capacity=100, obs_shape=2, batch_size=64, seed=1)
    _fill(buf, 10, 20)
    obs, actions, rewards, next_obs, terminated = buf.batch_tensors()
    buf.sample()
    ids = rewards[:, 0].numpy()
    assert set(ids) <= set(range(10, 30))
    np.testing.assert_array_equal(obs[:, 0].numpy(), ids)
    np.testing.assert_array_equal(next_obs[:, 0].numpy(), ids + 0.5)
    np.testing.assert_array_equal(actions[:, 0].numpy(), ids.astype(int) % 2)
    np.testing.assert_array_equal(terminated[:, 0].numpy(), (ids.astype(int) % 7 == 0))


def test_batch_tensors_are_views_refreshed_by_sample():
    buf = ReplayBuffer(capacity=50, obs_shape=1, batch_size=16, seed=2)
    _fill(buf, 0, 50)
    rewards = buf.batch_tensors()[2]
    buf.sample()
    first = rewards.clone()
    buf.sample()
    assert not np.array_equal(first.numpy(), rewards.numpy())


def test_sampling_from_empty_buffer_is_refused():
    buf = ReplayBuffer(capacity=4, obs_shape=1, batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample()


def test_save_load_round_trip_restores_contents_order_and_rng(tmp_path):
    buf = ReplayBuffer(capacity=6, obs_shape=2, batch_size=3, seed=3)
    _fill(buf, 0, 9)  # wrapped
    buf.save(tmp_path / "buf.npz")
    restored = ReplayBuffer(capacity=6, obs_shape=2, batch_size=3, seed=99)
    restored.load(tmp_path / "buf.npz")
    assert len(restored) == 6
    buf.sample()
    restored.sample()
    np.testing.assert_array_equal(buf.batch_tensors()[2].numpy(),
                                  restored.batch_tensors()[2].numpy())
    _fill(restored, 100, 1)  # the oldest (reward 3) is the one overwritten next
    assert 3.0 not in restored.rewards and 100.0 in restored.rewards


def test_load_refuses_a_buffer_of_another_observation_size(tmp_path):
    buf = ReplayBuffer(capacity=4, obs_shape=2, batch_size=2, seed=0)
    _fill(buf, 0, 2)
    buf.save(tmp_path / "buf.npz")
    with pytest.raises(ValueError, match="shape"):
        ReplayBuffer(capacity=4, obs_shape=3, batch_size=2, seed=0).load(tmp_path / "buf.npz")


def test_load_into_a_different_capacity_keeps_the_newest_in_order(tmp_path):
    buf = ReplayBuffer(capacity=5, obs_shape=1, batch_size=2, seed=0)
    _fill(buf, 0, 8)  # holds 3..7, wrapped
    buf.save(tmp_path / "buf.npz")
    bigger = ReplayBuffer(capacity=10, obs_shape=1, batch_size=2, seed=0)
    bigger.load(tmp_path / "buf.npz")
    assert bigger.rewards[:5].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0] and bigger.pos == 5
    smaller = ReplayBuffer(capacity=3, obs_shape=1, batch_size=2, seed=0)
    smaller.load(tmp_path / "buf.npz")
    assert smaller.rewards.tolist() == [5.0, 6.0, 7.0] and len(smaller) == 3
