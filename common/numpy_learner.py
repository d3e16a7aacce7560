"""The DQN learner of an MLP Q-network in numpy alone (``backend = "numpy"``).

Same semantics as the torch learner (:mod:`common.dqn`), step for step: Huber or MSE TD
loss on ``r + gamma (1 - terminated) Q_target(s', a*)`` (a* from the online net with
Double DQN), the FedProx gradient ``mu (w - w_anchor)``, the global gradient-norm clip of
``clip_grad_norm_`` (1e-6 guard), Adam with ``torch.optim.Adam``'s defaults and bias
correction, hard or Polyak target sync; ``tests/test_numpy_backend.py`` checks that both
produce the same weights and Adam moments from the same weights and batches.

Why a second learner: a device then needs no torch (~220 MiB per ClientApp process and
a CUDA-pulling wheel on aarch64), and for fedq's small MLPs torch's per-call overhead
dominates the arithmetic. The backward pass is written out by hand (Linear and ReLU
only), every intermediate lives in arrays preallocated for the batch size, and the
parameters, gradients and Adam moments are each one flat vector
(:class:`common.mlp_params.FlatParams`), so a non-private update allocates no array.

:class:`PrivateNumpyDQNLearner` is DP-SGD as :class:`common.dqn.PrivateDQNLearner` does
it: Poisson-sampled batch, per-transition gradients clipped in closed form (a Linear
layer's per-sample weight gradient is the outer product ``g_i a_i^T``, of norm
``|g_i| |a_i|``), Gaussian noise from OS entropy, accounted by :mod:`common.rdp`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedq.common.atomic import PRIVATE, atomic_open
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.learners import STATE_FILES
from fedq.common.mlp_forward import MlpForward
from fedq.common.mlp_params import FlatParams
from fedq.common.network_registry import build_network
from fedq.common.privacy import DevicePrivacy, poisson_indices, sample_rate
from fedq.common.replay_buffer import ReplayBuffer
from fedq.common.return_bounds import return_bounds

if TYPE_CHECKING:
    import gymnasium as gym

STATE_FILE = STATE_FILES["numpy"]
_STATE_VERSION = 1
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the torch learner uses
ADAM_EPS = 1e-8
_CLIP_GUARD = 1e-6  # clip_grad_norm_'s: max_norm / (total + 1e-6)


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray,
             outs: list[np.ndarray], bias_rows: list[np.ndarray] | None = None) -> np.ndarray:
    """``Linear -> ReLU -> ... -> Linear`` of a batch into ``outs`` (one per layer, kept
    for the backward pass: a ReLU output is > 0 exactly where its input was).

    The bias is first copied into every row of ``bias_rows`` (scratch shaped like
    ``outs``) and then added: numpy 2.4's broadcasting ``add`` allocates a temporary the
    size of the output and took ~3x as long as the copy and a same-shape add.
    """
    h = x
    last = len(layers) - 1
    rows = bias_rows or [np.empty_like(o) for o in outs]
    for i, ((weight, bias), out, row) in enumerate(zip(layers, outs, rows, strict=True)):
        np.matmul(h, weight.T, out=out)
        np.copyto(row, bias)
        np.add(out, row, out=out)
        if i < last:
            np.maximum(out, 0.0, out=out)
        h = out
    return h


class NumpyDQNLearner:
    """Online and target MLP, Adam state and the TD update, all in numpy."""

    backend = "numpy"

    def __init__(self, observation_space: gym.spaces.Box | int, n_actions: int,
                 config: FedqConfig, seed: int = 0) -> None:
        """``observation_space``: the env's (an int ``n``: a flat row of ``n`` floats)."""
        self.config = config
        self.online = build_network(config, observation_space, n_actions, "numpy")
        self.layout = self.online.layout
        self.online.init_like_torch(np.random.default_rng(seed))
        self.target = FlatParams(self.layout)
        np.copyto(self.target.flat, self.online.flat)
        self.grad = FlatParams(self.layout)
        self.exp_avg = np.zeros_like(self.online.flat)
        self.exp_avg_sq = np.zeros_like(self.online.flat)
        self.adam_steps = 0
        self._scratch = np.zeros_like(self.online.flat)
        self._layers = self.online.layers()
        self._target_layers = self.target.layers()
        self._grad_layers = self.grad.layers()
        # acting reads the live online weights: every update and load is seen at once
        self.policy = MlpForward([(w.T, b) for w, b in self._layers])
        self.proximal_mu = 0.0
        self._anchor: np.ndarray | None = None
        self.learning_rate = config.learning_rate
        self.target_bounds = (return_bounds(config.env_id, config.env_kwargs, config.gamma)
                              if config.td_target_clip else None)

    def set_learning_rate(self, lr: float) -> None:
        """The Adam step size of later updates (the trainer's learning-rate schedule)."""
        self.learning_rate = lr

    # --- the update ----------------------------------------------------------------------
    def bind(self, buffer: ReplayBuffer) -> None:
        """Attach the buffer whose preallocated batch arrays updates read, and allocate
        every intermediate of an update for its batch size once."""
        self.buffer = buffer
        obs, actions, rewards, next_obs, terminated = buffer.batch_arrays()
        self._obs, self._next_obs = obs, next_obs
        self._actions, self._rewards = actions[:, 0], rewards[:, 0]
        self._terminated = terminated[:, 0]
        batch = obs.shape[0]
        widths = [w.shape[0] for w, _ in self._layers]
        self._outs = [np.empty((batch, n), np.float32) for n in widths]
        self._next_online = [np.empty((batch, n), np.float32) for n in widths]
        self._next_target = [np.empty((batch, n), np.float32) for n in widths]
        self._douts = [np.empty((batch, n), np.float32) for n in widths]
        self._bias_rows = [np.empty((batch, n), np.float32) for n in widths]
        self._dead = [np.empty((batch, n), np.bool_) for n in widths[:-1]]
        self._row_base = np.arange(batch, dtype=np.int64) * widths[-1]
        self._flat_index = np.empty(batch, np.int64)
        self._best = np.empty(batch, np.int64)
        self._y = np.empty(batch, np.float32)
        self._q = np.empty(batch, np.float32)
        self._delta = np.empty(batch, np.float32)
        self._tmp = np.empty(batch, np.float32)
        self._tmp2 = np.empty(batch, np.float32)

    def update(self) -> float:
        """Sample a batch and take one gradient step; returns the loss."""
        self.buffer.sample()
        y = self._td_target_into(self._y)
        q_all = _forward(self._layers, self._obs, self._outs, self._bias_rows)
        index = np.add(self._row_base, self._actions, out=self._flat_index)
        q = np.take(q_all.reshape(-1), index, out=self._q)
        delta = np.subtract(q, y, out=self._delta)
        loss = self._loss_and_output_grad(delta)
        dout = self._douts[-1]
        dout.fill(0.0)
        dout.reshape(-1)[index] = delta  # delta now holds dLoss/dq of each row
        self._backward(self._obs, self._outs, self._douts, self._dead)
        if self.proximal_mu:
            self._add_proximal_gradient()
        self._clip_gradient(self.config.max_grad_norm)
        self._adam_step()
        return loss

    def _loss_and_output_grad(self, delta: np.ndarray) -> float:
        """The batch-mean loss; overwrites ``delta`` with the loss's gradient in q."""
        n = delta.shape[0]
        if self.config.loss == "huber":  # smooth_l1_loss, beta 1: c (|d| - c/2), c = min(|d|, 1)
            absolute = np.abs(delta, out=self._tmp)
            clipped = np.minimum(absolute, 1.0, out=self._tmp2)
            loss = float(np.dot(clipped, absolute) - 0.5 * np.dot(clipped, clipped)) / n
            np.clip(delta, -1.0, 1.0, out=delta)
            delta *= 1.0 / n
        else:  # mse_loss
            loss = float(np.dot(delta, delta)) / n
            delta *= 2.0 / n
        return loss

    def _td_target_into(self, out: np.ndarray) -> np.ndarray:
        """``r + gamma (1 - terminated) Q_target(s', a*)`` of the bound batch, into ``out``."""
        cfg = self.config
        next_target = _forward(self._target_layers, self._next_obs, self._next_target,
                               self._bias_rows)
        if cfg.double_dqn:
            next_online = _forward(self._layers, self._next_obs, self._next_online,
                                   self._bias_rows)
            np.argmax(next_online, axis=1, out=self._best)
            np.add(self._row_base, self._best, out=self._flat_index)
            np.take(next_target.reshape(-1), self._flat_index, out=out)
        else:
            np.max(next_target, axis=1, out=out)
        tmp = np.subtract(1.0, self._terminated, out=self._tmp)
        tmp *= cfg.gamma
        out *= tmp
        out += self._rewards
        if self.target_bounds is not None:  # td-target-clip
            np.clip(out, *self.target_bounds, out=out)
        return out

    def _backward(self, x: np.ndarray, outs: list[np.ndarray], douts: list[np.ndarray],
                  dead: list[np.ndarray]) -> None:
        """Gradients of every layer into :attr:`grad` from ``douts[-1]`` (dLoss/dOutput);
        ``douts`` and ``dead`` are scratch space for the hidden layers."""
        for i in range(len(self._layers) - 1, -1, -1):
            weight, _ = self._layers[i]
            grad_w, grad_b = self._grad_layers[i]
            a_in = x if i == 0 else outs[i - 1]
            np.matmul(douts[i].T, a_in, out=grad_w)
            np.sum(douts[i], axis=0, out=grad_b)
            if i:
                np.matmul(douts[i], weight, out=douts[i - 1])
                np.less_equal(outs[i - 1], 0.0, out=dead[i - 1])
                np.copyto(douts[i - 1], 0.0, where=dead[i - 1])

    def _add_proximal_gradient(self) -> None:
        scratch = np.subtract(self.online.flat, self._anchor, out=self._scratch)
        scratch *= self.proximal_mu
        self.grad.flat += scratch

    def _clip_gradient(self, max_norm: float) -> None:
        g = self.grad.flat
        total = float(np.sqrt(np.dot(g, g)))
        g *= min(max_norm / (total + _CLIP_GUARD), 1.0)

    def _adam_step(self) -> None:
        """``torch.optim.Adam`` (lr, betas 0.9/0.999, eps 1e-8, no weight decay)."""
        beta1, beta2 = ADAM_BETAS
        self.adam_steps += 1
        g, m, v, scratch = self.grad.flat, self.exp_avg, self.exp_avg_sq, self._scratch
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=scratch)
        m += scratch
        np.multiply(g, g, out=scratch)
        scratch *= 1.0 - beta2
        v *= beta2
        v += scratch
        bias1 = 1.0 - beta1 ** self.adam_steps
        bias2_sqrt = (1.0 - beta2 ** self.adam_steps) ** 0.5
        np.sqrt(v, out=scratch)
        scratch *= 1.0 / bias2_sqrt
        scratch += ADAM_EPS
        np.divide(m, scratch, out=scratch)
        scratch *= self.learning_rate / bias1
        self.online.flat -= scratch

    # --- federated plumbing (the torch learner offers the same) ----------------------
    def set_proximal(self, mu: float) -> None:
        """FedProx: later updates add ``mu (w - w_anchor)``, anchored at the current
        online weights (the global model just loaded); 0 turns it off."""
        self.proximal_mu = float(mu)
        self._anchor = self.online.flat.copy() if mu > 0 else None

    def sync_target(self) -> None:
        """Hard copy (tau = 1) or Polyak average (torch's ``lerp_``) of online into target."""
        tau = self.config.tau
        if tau >= 1.0:
            np.copyto(self.target.flat, self.online.flat)
            return
        scratch = np.subtract(self.online.flat, self.target.flat, out=self._scratch)
        scratch *= tau
        self.target.flat += scratch

    def load_online(self, state: Mapping[str, np.ndarray], sync_target: bool = True) -> None:
        """Load checked weights (:func:`common.weights.check_arrays`) in place."""
        self.online.load(state)
        if sync_target:
            np.copyto(self.target.flat, self.online.flat)

    def online_arrays(self) -> dict[str, np.ndarray]:
        """The online weights by state-dict name (views: copy before changing them)."""
        return dict(self.online.views)

    # --- persistence -------------------------------------------------------------------
    def save(self, directory: Path, extra: dict) -> None:
        """Write weights, Adam state and ``extra`` (JSON-able) to ``directory``."""
        arrays = {f"online:{k}": v for k, v in self.online.views.items()}
        arrays |= {f"target:{k}": v for k, v in self.target.views.items()}
        arrays["adam:exp_avg"] = self.exp_avg
        arrays["adam:exp_avg_sq"] = self.exp_avg_sq
        meta = {"version": _STATE_VERSION, "adam_steps": self.adam_steps, "extra": extra}
        with atomic_open(directory / STATE_FILE, permissions=PRIVATE) as fh:
            np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     **arrays)

    def load(self, directory: Path) -> dict:
        """Restore what :meth:`save` wrote; returns its ``extra``."""
        path = directory / STATE_FILE
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("version") != _STATE_VERSION:
                raise ValueError(f"{path}: unsupported learner state version "
                                 f"{meta.get('version')}")
            for prefix, params in (("online", self.online), ("target", self.target)):
                stored = {k.split(":", 1)[1]: data[k] for k in data.files
                          if k.startswith(prefix + ":")}
                _check_layout(path, stored, self.layout)
                params.load(stored)
            for name, into in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                np.copyto(into, data[f"adam:{name}"])
        self.adam_steps = int(meta["adam_steps"])
        return meta["extra"]


def _check_layout(path: Path, stored: Mapping[str, np.ndarray], layout: dict) -> None:
    shapes = {k: tuple(v.shape) for k, v in stored.items()}
    if shapes != layout:
        raise ConfigError("hidden-sizes", f"{path} holds a network of layout {shapes}, "
                          f"the config asks for {layout}")


class PrivateNumpyDQNLearner(NumpyDQNLearner):
    """DP-SGD steps as :class:`common.dqn.PrivateDQNLearner` takes them, in numpy."""

    def __init__(self, observation_space: gym.spaces.Box | int, n_actions: int,
                 config: FedqConfig, privacy: DevicePrivacy, seed: int = 0) -> None:
        super().__init__(observation_space, n_actions, config, seed)
        self.privacy = privacy
        # batches and noise from OS entropy, never from the run's (server-known) seed
        self.sampling_rng = np.random.default_rng()
        self.noise_rng = np.random.default_rng()
        self._noise = np.empty_like(self.grad.flat)

    def update(self) -> float:
        """One DP-SGD step on a Poisson-sampled batch; returns the batch's mean loss."""
        cfg = self.config
        n = len(self.buffer)
        rate = sample_rate(cfg.batch_size, n)
        noise = self.privacy.noise_multiplier
        obs, actions, rewards, next_obs, terminated = self.buffer.gather_arrays(
            poisson_indices(n, rate, self.sampling_rng))
        batch = obs.shape[0]
        y = self._td_targets(rewards[:, 0], next_obs, terminated[:, 0])
        outs = [np.empty((batch, w.shape[0]), np.float32) for w, _ in self._layers]
        q_all = _forward(self._layers, obs, outs)
        rows = np.arange(batch)
        delta = q_all[rows, actions[:, 0]] - y
        absolute = np.abs(delta)
        if cfg.loss == "huber":
            clipped = np.minimum(absolute, 1.0)
            losses = clipped * (absolute - 0.5 * clipped)
            per_sample = np.clip(delta, -1.0, 1.0)
        else:
            losses = delta * delta
            per_sample = 2.0 * delta
        douts = [np.empty_like(o) for o in outs]
        douts[-1].fill(0.0)
        douts[-1][rows, actions[:, 0]] = per_sample
        self._clipped_sum(obs, outs, douts)
        self._noise[...] = self.noise_rng.standard_normal(self._noise.shape, np.float32)
        self._noise *= noise * cfg.dp_clip_norm
        self.grad.flat += self._noise
        self.grad.flat *= 1.0 / (rate * n)
        if self.proximal_mu:  # a function of w and the global model: post-processing
            self._add_proximal_gradient()
        self._adam_step()
        self.privacy.accountant.step(noise_multiplier=noise, sample_rate=rate)
        return float(losses.sum()) / max(batch, 1)

    def _td_targets(self, rewards: np.ndarray, next_obs: np.ndarray,
                    terminated: np.ndarray) -> np.ndarray:
        """TD targets of a variable-size batch; each row depends on its own transition."""
        batch = next_obs.shape[0]
        widths = [w.shape[0] for w, _ in self._layers]
        next_q = _forward(self._target_layers, next_obs,
                          [np.empty((batch, n), np.float32) for n in widths])
        if self.config.double_dqn:
            best = _forward(self._layers, next_obs,
                            [np.empty((batch, n), np.float32) for n in widths]).argmax(1)
            value = next_q[np.arange(batch), best]
        else:
            value = next_q.max(1)
        targets = rewards + self.config.gamma * (1.0 - terminated) * value
        if self.target_bounds is not None:  # td-target-clip
            np.clip(targets, *self.target_bounds, out=targets)
        return targets

    def _clipped_sum(self, x: np.ndarray, outs: list[np.ndarray],
                     douts: list[np.ndarray]) -> np.ndarray:
        """Sum of per-transition gradients, each clipped to ``dp-clip-norm``, into
        :attr:`grad`; returns the per-transition norms before clipping."""
        inputs = [x, *outs[:-1]]
        for i in range(len(self._layers) - 1, 0, -1):  # dLoss_j/dOutput of every layer
            np.matmul(douts[i], self._layers[i][0], out=douts[i - 1])
            douts[i - 1][outs[i - 1] <= 0.0] = 0.0
        squared = np.zeros(x.shape[0], np.float32)
        for a, g in zip(inputs, douts, strict=True):
            squared += np.einsum("ij,ij->i", g, g) * (np.einsum("ij,ij->i", a, a) + 1.0)
        norms = np.sqrt(squared)
        scale = np.minimum(self.config.dp_clip_norm / (norms + _CLIP_GUARD), 1.0)
        for (grad_w, grad_b), a, g in zip(self._grad_layers, inputs, douts, strict=True):
            clipped = g * scale[:, None]
            np.matmul(clipped.T, a, out=grad_w)
            np.sum(clipped, axis=0, out=grad_b)
        return norms

