"""The DQN learner: online and target Q-networks, the TD update and the epsilon schedule.

Read top to bottom like CleanRL's ``dqn.py``, packaged as a component: the env loop
lives in :mod:`common.trainer`, the transitions in :mod:`common.replay_buffer`.

The TD target bootstraps on ``terminated`` only. A truncated transition (time limit)
still bootstraps from its real next observation, because the episode did not end in
the MDP's sense.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedq.common.atomic import PRIVATE, atomic_open
from fedq.common.config import FedqConfig
from fedq.common.dp_sgd import DPSGD
from fedq.common.learners import STATE_FILES
from fedq.common.network_registry import build_network
from fedq.common.networks import QNetwork, greedy_policy
from fedq.common.privacy import DevicePrivacy, poisson_indices, sample_rate
from fedq.common.replay_buffer import ReplayBuffer
from fedq.common.return_bounds import return_bounds

if TYPE_CHECKING:
    import gymnasium as gym


def td_targets(rewards: torch.Tensor, next_q_online: torch.Tensor | None,
               next_q_target: torch.Tensor, terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + gamma * (1 - terminated) * Q_target(s', a*), shape (batch, 1).

    With ``next_q_online`` given (Double DQN), a* is the online net's argmax and the
    target net evaluates it; otherwise a* is the target net's own argmax.
    """
    if next_q_online is None:
        next_value = next_q_target.max(dim=1, keepdim=True).values
    else:
        next_value = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True))
    return rewards + gamma * (1.0 - terminated) * next_value


@torch.no_grad()
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    What ``nn.utils.clip_grad_norm_(foreach=True)`` computes (same 1e-6 guard), without
    its per-call checks and conversions, which cost as much as the arithmetic here.
    """
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))


STATE_FILE = STATE_FILES["torch"]


class DQNLearner:
    """Owns the networks and optimizer; one :meth:`update` is one gradient step."""

    backend = "torch"

    def __init__(self, observation_space: gym.spaces.Box | int, n_actions: int,
                 config: FedqConfig) -> None:
        """``observation_space``: the env's (an int ``n``: a flat row of ``n`` floats)."""
        self.config = config
        # Dead ReLU units leave Adam's first moments decaying through the float32 denormal
        # range, where x86 arithmetic is many times slower: the optimizer step of a
        # CartPole learner measured 96 us with denormals, 42 us flushed to zero. Values
        # that small (< 1.2e-38) carry no information for the update. Process-wide.
        torch.set_flush_denormal(True)
        self.online = build_network(config, observation_space, n_actions, "torch")
        self.target = build_network(config, observation_space, n_actions, "torch")
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        # fused Adam: one kernel for all parameters instead of a Python loop per tensor
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=config.learning_rate,
                                          fused=True)
        self.policy = greedy_policy(self.online)
        self.loss_fn = F.smooth_l1_loss if config.loss == "huber" else F.mse_loss
        self.params = list(self.online.parameters())
        self.proximal_mu = 0.0
        self._anchor: list[torch.Tensor] = []
        self.target_bounds = (return_bounds(config.env_id, config.env_kwargs, config.gamma)
                              if config.td_target_clip else None)

    def set_learning_rate(self, lr: float) -> None:
        """The Adam step size of later updates (the trainer's learning-rate schedule)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_proximal(self, mu: float) -> None:
        """FedProx: from now on every update adds the gradient of
        ``mu/2 ||w - w_anchor||^2``, with the anchor the online weights at this call (the
        global model just loaded). ``mu = 0`` turns the term off and costs nothing.

        The term is added to the gradient (``mu (w - w_anchor)``) rather than built into
        the loss graph: the same gradient without an autograd node per parameter, and the
        reported loss stays the TD loss, comparable across strategies.
        """
        self.proximal_mu = float(mu)
        self._anchor = [p.detach().clone() for p in self.params] if mu > 0 else []

    @torch.no_grad()
    def _add_proximal_gradient(self) -> None:
        grads = [p.grad for p in self.params]
        torch._foreach_add_(grads, torch._foreach_sub(self.params, self._anchor),
                            alpha=self.proximal_mu)

    def bind(self, buffer: ReplayBuffer) -> None:
        """Attach the buffer whose (shared-memory) batch tensors updates read."""
        self.buffer = buffer
        self._batch = buffer.batch_tensors()

    def update(self) -> float:
        """Sample a batch and take one gradient step; returns the loss."""
        self.buffer.sample()
        obs, actions, rewards, next_obs, terminated = self._batch
        target = self.td_target(rewards, next_obs, terminated)
        q = self.online(obs).gather(1, actions)
        loss = self.loss_fn(q, target)
        # set_to_none: backward writes fresh gradients instead of zeroing and adding to
        # old ones (~80 us of an ~800 us update at this size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.proximal_mu:
            self._add_proximal_gradient()
        clip_grad_norm([p.grad for p in self.params], self.config.max_grad_norm)
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def td_target(self, rewards: torch.Tensor, next_obs: torch.Tensor,
                  terminated: torch.Tensor) -> torch.Tensor:
        """TD targets of a batch, outside autograd: no gradient ever reaches the target
        net, and each row depends on its own transition only (what DP-SGD needs)."""
        cfg = self.config
        next_q_target = self.target(next_obs)
        next_q_online = self.online(next_obs) if cfg.double_dqn else None
        targets = td_targets(rewards, next_q_online, next_q_target, terminated, cfg.gamma)
        if self.target_bounds is not None:  # td-target-clip
            targets.clamp_(*self.target_bounds)
        return targets

    @torch.no_grad()
    def sync_target(self) -> None:
        """Hard copy (tau = 1) or Polyak average of online into target."""
        tau = self.config.tau
        if tau >= 1.0:
            self.target.load_state_dict(self.online.state_dict())
            return
        for t, o in zip(self.target.parameters(), self.params, strict=True):
            t.lerp_(o, tau)

    def load_online(self, state: Mapping[str, torch.Tensor | np.ndarray],
                    sync_target: bool = True) -> None:
        """Load weights (tensors or arrays) in place (the numpy policy keeps pointing at
        them)."""
        self.online.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        if sync_target:
            self.target.load_state_dict(self.online.state_dict())

    @property
    def layout(self) -> dict[str, tuple[int, ...]]:
        """State-dict names and shapes of the Q-network."""
        return {k: tuple(v.shape) for k, v in self.online.state_dict().items()}

    def online_arrays(self) -> dict[str, np.ndarray]:
        """The online weights by state-dict name (views: copy before changing them)."""
        return {k: v.numpy() for k, v in self.online.state_dict().items()}

    def save(self, directory: Path, extra: dict) -> None:
        """Write networks, optimizer, torch's RNG and ``extra`` to ``directory`` (the
        file layout fedq devices have always used)."""
        with atomic_open(directory / STATE_FILE, permissions=PRIVATE) as fh:
            torch.save({"learner": self.state_dict(), **extra,
                        "torch_rng": torch.get_rng_state()}, fh)

    def load(self, directory: Path) -> dict:
        """Restore what :meth:`save` wrote (torch's RNG too); returns the ``extra``."""
        state = torch.load(directory / STATE_FILE, weights_only=True)
        self.load_state_dict(state.pop("learner"))
        torch.set_rng_state(state.pop("torch_rng"))
        return state

    def state_dict(self) -> dict:
        return {"online": self.online.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])


class PrivateDQNLearner(DQNLearner):
    """A DQN learner whose online-network steps are DP-SGD steps, each one stepped into
    the device's Opacus accountant (:class:`common.privacy.DevicePrivacy`).

    What differs from :meth:`DQNLearner.update`, each for the guarantee: the batch is a
    Poisson sample at :func:`common.privacy.sample_rate` (what the accountants analyse;
    fixed-size sampling with replacement is not); per-transition clipping to
    ``dp-clip-norm`` replaces the global ``max-grad-norm`` clip; Gaussian noise is added;
    and batches and noise draw from OS entropy instead of the run's seed, which the
    server knows and could replay them from. The target network is never trained.
    """

    def __init__(self, observation_space: gym.spaces.Box | int, n_actions: int,
                 config: FedqConfig, privacy: DevicePrivacy) -> None:
        super().__init__(observation_space, n_actions, config)
        noise_generator = torch.Generator()
        noise_generator.seed()  # from OS entropy; torch.Generator() alone has a fixed seed
        # the closed form covers MLPs; other networks take Opacus's ghost clipping
        if isinstance(self.online, QNetwork):
            self.dp = DPSGD(self.online, config.dp_clip_norm, noise_generator)
        else:
            from fedq.common.dp_sgd_opacus import PerSampleDPSGD  # Opacus's import: ~2 s

            self.dp = PerSampleDPSGD(self.online, config.dp_clip_norm, noise_generator)
        self.privacy = privacy
        self.sampling_rng = np.random.default_rng()  # from OS entropy

    def update(self) -> float:
        """One DP-SGD step on a Poisson-sampled batch; returns the batch's mean loss."""
        n = len(self.buffer)
        rate = sample_rate(self.config.batch_size, n)
        noise = self.privacy.noise_multiplier
        obs, actions, rewards, next_obs, terminated = self.buffer.gather(
            poisson_indices(n, rate, self.sampling_rng))
        target = self.td_target(rewards, next_obs, terminated)
        losses = self.loss_fn(self.dp.forward(obs).gather(1, actions), target,
                              reduction="none")
        self.dp.backward(losses, noise, expected_batch_size=rate * n)
        if self.proximal_mu:  # a function of w and the global model: post-processing
            self._add_proximal_gradient()
        self.optimizer.step()
        self.privacy.accountant.step(noise_multiplier=noise, sample_rate=rate)
        return losses.sum().item() / max(len(losses), 1)
