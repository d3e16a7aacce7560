"""The local learner: truncation handling in the env loop, and a device state that
survives a restart exactly (a restarted device continues as if it never stopped)."""

import json

import numpy as np
import pytest
import torch

from common.config import FedqConfig
from common.trainer import LocalTrainer

SMALL = {"hidden-sizes": "16,16", "buffer-size": 2000, "batch-size": 32, "learning-starts": 200,
         "train-frequency": 2, "target-update-interval": 100, "exploration-steps": 1000}


def _trainer(seed=0, **overrides):
    return LocalTrainer(FedqConfig.from_mapping({**SMALL, **overrides}), seed=seed)


def test_truncated_steps_are_stored_as_non_terminal_with_the_real_final_observation():
    trainer = _trainer(**{"env-kwargs": '{"max_episode_steps": 5}', "learning-starts": 10_000})
    stats = trainer.train(23)
    buf = trainer.buffer
    assert stats.episode_returns  # CartPole with a 5-step limit: episodes end by truncation
    assert buf.terminated[:23].sum() == 0  # none of them terminated in the MDP sense
    # every 5th transition ends an episode: its next_obs is the true final observation,
    # not the reset observation that starts the next episode
    assert not np.array_equal(buf.next_obs[4], buf.obs[5])
    np.testing.assert_array_equal(buf.next_obs[3], buf.obs[4])


def test_terminated_steps_are_stored_as_terminal():
    trainer = _trainer(**{"learning-starts": 10_000})
    stats = trainer.train(300)  # random CartPole episodes terminate in ~20 steps
    assert buf_terminals(trainer) == len(stats.episode_returns)


def buf_terminals(trainer):
    return int(trainer.buffer.terminated[: len(trainer.buffer)].sum())


def test_train_reports_updates_epsilon_and_counters():
    trainer = _trainer()
    stats = trainer.train(600)
    assert stats.updates == (600 - 200) // 2
    assert stats.epsilon == pytest.approx(1.0 + (0.02 - 1.0) * 0.6)
    assert trainer.counters.env_steps == 600 and trainer.counters.updates == stats.updates
    assert np.isfinite(stats.mean_loss)


def test_restart_continues_exactly_where_the_saved_state_left_off(tmp_path):
    original = _trainer(seed=7)
    original.train(700)
    original.save(tmp_path)
    restarted = _trainer(seed=7)
    assert restarted.load(tmp_path)
    assert restarted.counters == original.counters
    original._obs = None  # the restarted process starts a fresh episode; so does the reference
    a, b = original.train(500), restarted.train(500)
    assert a.episode_returns == b.episode_returns and a.mean_loss == b.mean_loss
    for p, q in zip(original.learner.online.parameters(), restarted.learner.online.parameters(),
                    strict=True):
        assert torch.equal(p, q)


def test_load_of_an_empty_directory_reports_no_state(tmp_path):
    assert _trainer().load(tmp_path / "nothing-here") is False


def test_a_save_interrupted_before_its_pointer_flip_leaves_the_previous_state(tmp_path):
    trainer = _trainer()
    trainer.train(300)
    trainer.save(tmp_path)
    # a crash during the next save: new generation half-written, pointer not flipped
    torn = tmp_path / "gen-000002"
    torn.mkdir()
    (torn / "learner.pt").write_bytes(b"\x00garbage")
    (torn / "counters.json").write_text(json.dumps({"env_steps": 999}))
    restarted = _trainer()
    assert restarted.load(tmp_path)
    assert restarted.counters.env_steps == 300
