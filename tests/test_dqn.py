"""The DQN pieces users rely on: epsilon schedule, TD targets (terminated vs truncated,
Double DQN), target-network syncing and the numpy acting path."""

import numpy as np
import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.common.dqn import DQNLearner, td_targets
from fedq.common.exploration import linear_epsilon
from fedq.common.networks import NumpyPolicy, QNetwork


def test_linear_epsilon_decays_then_stays_flat():
    assert linear_epsilon(0, 1.0, 0.1, 100) == 1.0
    assert linear_epsilon(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert linear_epsilon(100, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert linear_epsilon(10_000, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert linear_epsilon(0, 1.0, 0.1, 0) == pytest.approx(0.1)


def test_td_target_bootstraps_through_truncation_but_not_termination():
    rewards = torch.tensor([[1.0], [1.0]])
    next_q = torch.tensor([[2.0, 5.0], [2.0, 5.0]])
    terminated = torch.tensor([[1.0], [0.0]])  # row 1: truncated or ongoing -> bootstrap
    target = td_targets(rewards, None, next_q, terminated, gamma=0.9)
    assert target[:, 0].tolist() == pytest.approx([1.0, 1.0 + 0.9 * 5.0])


def test_double_dqn_target_evaluates_the_online_argmax_with_the_target_net():
    rewards = torch.zeros(1, 1)
    next_q_online = torch.tensor([[9.0, 1.0]])  # online prefers action 0
    next_q_target = torch.tensor([[2.0, 7.0]])  # target's own max would be 7
    double = td_targets(rewards, next_q_online, next_q_target, torch.zeros(1, 1), gamma=1.0)
    vanilla = td_targets(rewards, None, next_q_target, torch.zeros(1, 1), gamma=1.0)
    assert double.item() == pytest.approx(2.0)
    assert vanilla.item() == pytest.approx(7.0)


def test_numpy_policy_matches_torch_and_follows_in_place_updates():
    torch.manual_seed(0)
    net = QNetwork(4, 3, (16, 8))
    policy = NumpyPolicy(net)
    obs = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    got = np.stack([policy.q_values(o) for o in obs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    other = QNetwork(4, 3, (16, 8))
    net.load_state_dict(other.state_dict())  # in place: the numpy views see it
    with torch.no_grad():
        assert policy.act(obs[0]) == int(other(torch.from_numpy(obs[:1])).argmax())


def _learner(**overrides):
    return DQNLearner(4, 2, FedqConfig.from_mapping(overrides))


def test_hard_target_sync_copies_and_polyak_moves_partway():
    learner = _learner()
    with torch.no_grad():
        for p in learner.online.parameters():
            p.add_(1.0)
    learner.sync_target()
    for t, o in zip(learner.target.parameters(), learner.online.parameters(), strict=True):
        assert torch.equal(t, o)
    polyak = _learner(tau=0.25)
    before = [t.clone() for t in polyak.target.parameters()]
    with torch.no_grad():
        for p in polyak.online.parameters():
            p.add_(4.0)
    polyak.sync_target()
    for b, t in zip(before, polyak.target.parameters(), strict=True):
        torch.testing.assert_close(t, b + 1.0)


def test_update_reduces_td_error_on_a_fixed_batch():
    from fedq.common.replay_buffer import ReplayBuffer

    torch.manual_seed(0)
    learner = _learner(**{"learning-rate": 1e-2, "batch-size": 32})
    buf = ReplayBuffer(64, 4, 32, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(64):
        o = rng.normal(size=4).astype(np.float32)
        buf.add(o, int(rng.integers(2)), 1.0, o, terminated=True)  # target is exactly 1
    learner.bind(buf)
    losses = [learner.update() for _ in range(200)]
    assert losses[-1] < 0.05 * losses[0]


def test_clip_grad_norm_matches_torch():
    from fedq.common.dqn import clip_grad_norm

    torch.manual_seed(0)
    for scale in (0.01, 100.0):  # below the bound: untouched; above: scaled down
        grads = [torch.randn(5, 3) * scale, torch.randn(3) * scale]
        expected = [g.clone() for g in grads]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
        for p, g in zip(params, expected, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        clip_grad_norm(grads, 1.0)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
