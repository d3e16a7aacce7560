"""The device side of the new strategies and of the robustness benchmark: FedProx's
proximal term yields exactly the gradient of TD loss + mu/2 ||w - w_global||^2 and costs
nothing at mu = 0; the benchmark fault injector makes only the listed partitions send
NaN or large-norm weights."""

import numpy as np
import torch

from client.fault_injection import inject_fault
from common.config import FedqConfig
from common.trainer import LocalTrainer

SMALL = {"hidden-sizes": "16,16", "buffer-size": 500, "batch-size": 32,
         "learning-starts": 10_000, "max-grad-norm": 1e9, "learning-rate": 1e-12}


def test_proximal_term_adds_the_gradient_of_mu_half_squared_distance():
    mu = 0.3
    trainer = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=0)
    trainer.train(200)  # fill the buffer; learning-starts keeps it from updating
    learner = trainer.learner
    learner.set_proximal(mu)  # anchor: the weights as received from the server
    anchor = [p.detach().clone() for p in learner.params]
    with torch.no_grad():  # local training has moved the weights away from the anchor
        for p in learner.params:
            p.add_(torch.randn_like(p) * 0.1)
    learner.update()  # lr ~ 0: the weights stay where the gradient was taken

    obs, actions, rewards, next_obs, terminated = learner._batch
    target = learner.td_target(rewards, next_obs, terminated)
    loss = learner.loss_fn(learner.online(obs).gather(1, actions), target)
    loss = loss + mu / 2 * sum((p - a).square().sum()
                               for p, a in zip(learner.params, anchor, strict=True))
    expected = torch.autograd.grad(loss, learner.params)
    for p, g in zip(learner.params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_mu_zero_keeps_no_anchor():
    learner = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=0).learner
    learner.set_proximal(0.0)
    assert learner.proximal_mu == 0.0 and learner._anchor == []


def _weights():
    return {"w": np.ones((4, 3), np.float32), "b": np.zeros(4, np.float32)}


def test_only_listed_partitions_attack():
    config = FedqConfig.from_mapping({"attack": "nan", "attack-partitions": "1,3"})
    rng = np.random.default_rng(0)
    local = _weights()
    assert inject_fault(local, _weights(), config, 0, rng) is local
    assert inject_fault(local, _weights(), config, None, rng) is local  # a real device
    sent = inject_fault(local, _weights(), config, 3, rng)
    assert all(np.isnan(v).all() for v in sent.values())


def test_noise_attack_sends_global_plus_large_gaussian_noise():
    config = FedqConfig.from_mapping({"attack": "noise", "attack-partitions": 0,
                                      "attack-scale": 5.0})
    global_weights = _weights()
    sent = inject_fault(_weights(), global_weights, config, 0, np.random.default_rng(0))
    noise = np.concatenate([(sent[k] - global_weights[k]).ravel() for k in sent])
    assert sent["w"].dtype == np.float32
    assert 2.5 < noise.std() < 7.5  # 16 draws of N(0, 5^2)
