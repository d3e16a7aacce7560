"""The device side of FedProx: its proximal term yields exactly the gradient of TD loss +
mu/2 ||w - w_global||^2 and costs nothing at mu = 0. (The simulated attackers that this
file also covered are tested in test_attacks.py.)"""

import torch

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer

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
