"""The local learner: truncation handling in the env loop, and a device state that
survives a restart exactly (a restarted device continues as if it never stopped)."""

import json

import numpy as np
import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer

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


def test_federation_clock_places_epsilon_by_the_models_experience_not_the_devices():
    """exploration-clock 'federation': a fresh device handed a model that already learnt
    from 1000 env steps (the whole decay) acts greedily from its first step, and a
    device that has stepped before but carries a fresh model explores as at step 0."""
    overrides = {"learning-starts": 10_000, "exploration-final-eps": 0.0,
                 "exploration-clock": "federation"}
    fresh = _trainer(**overrides)
    stats = fresh.train(200, exploration_start=1000)
    assert stats.epsilon == 0.0
    stored = fresh.buffer
    greedy = [fresh.learner.policy.act(obs) for obs in stored.obs[:200]]
    np.testing.assert_array_equal(stored.actions[:200].ravel(), greedy)

    stepped = _trainer(**overrides)
    stepped.train(1000)  # its own clock is past the decay now
    assert stepped.epsilon() == 0.0
    stats = stepped.train(100, exploration_start=0)
    assert stats.epsilon == pytest.approx(1.0 - 100 / 1000)
    # epsilon 1.0 -> 0.9 over these steps: nearly every action is random, so about half
    # of them differ from the greedy action of CartPole's two
    actions = stepped.buffer.actions[1000:1100].ravel()
    greedy = [stepped.learner.policy.act(obs) for obs in stepped.buffer.obs[1000:1100]]
    assert 25 <= int((actions != np.array(greedy)).sum()) <= 75
    with pytest.raises(ValueError, match="exploration_start must be >= 0"):
        stepped.train(1, exploration_start=-1)


def test_a_long_round_reports_its_progress(caplog):
    """train() calls its progress callback every PROGRESS_EVERY env steps with the steps
    done so far; the ClientApp turns that into a '[fedq] <device>: done/total' log line."""
    import logging

    from fedq.client.client_app import round_progress
    from fedq.common.trainer import PROGRESS_EVERY

    config = FedqConfig.from_mapping({"learning-starts": 100, "buffer-size": 5000})
    trainer = LocalTrainer(config, seed=0)
    seen: list[int] = []
    trainer.train(2 * PROGRESS_EVERY + 10, progress=seen.append)
    assert seen == [PROGRESS_EVERY, 2 * PROGRESS_EVERY]
    trainer.close()
    report = round_progress("partition-3", 5000, every_s=0.0)
    with caplog.at_level(logging.INFO):
        report(1000)
    assert "[fedq] partition-3: 1000/5000 env steps this round" in caplog.text
