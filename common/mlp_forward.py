"""The greedy forward pass of a ReLU MLP in plain numpy, with no torch import.

One implementation serves both places that act one observation at a time: the learner's
epsilon-greedy acting during training (:class:`common.networks.NumpyPolicy`, on views of
the live torch parameters) and the on-device runner (:mod:`client.policy_runner`, on
weights loaded from an exported policy file, where torch is not installed). At batch 1,
torch's per-call overhead (~25 µs) dwarfs the arithmetic of a small MLP; numpy with
preallocated activations decides in ~5 µs and allocates nothing per decision, so a long
control loop never triggers the garbage collector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Layer = tuple[np.ndarray, np.ndarray]  # (weight transposed to (in, out), bias (out,))


class MlpForward:
    """``Linear -> ReLU -> ... -> Linear`` on float32 ``(w_t, b)`` pairs.

    The arrays are used as given (not copied): a caller that passes views of torch
    parameters sees every in-place optimizer step without re-syncing.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        if not layers:
            raise ValueError("an MLP needs at least one layer")
        width = layers[0][0].shape[0]
        for i, (w_t, b) in enumerate(layers):
            if w_t.ndim != 2 or w_t.shape[0] != width or b.shape != (w_t.shape[1],):
                raise ValueError(f"layer {i}: weight {w_t.shape} / bias {b.shape} do not "
                                 f"chain from width {width}")
            width = w_t.shape[1]
        self.obs_dim = layers[0][0].shape[0]
        self.n_actions = width
        self._input = np.zeros(self.obs_dim, dtype=np.float32)
        self._hidden = [(w_t, b, np.zeros(w_t.shape[1], dtype=np.float32))
                        for w_t, b in layers[:-1]]
        w_t, b = layers[-1]
        self._last = (w_t, b, np.zeros(w_t.shape[1], dtype=np.float32))

    @property
    def input_buffer(self) -> np.ndarray:
        """The preallocated input row; :meth:`forward_input` reads it."""
        return self._input

    def forward_input(self) -> np.ndarray:
        """Q-values of whatever :attr:`input_buffer` holds, in a reused output array."""
        matmul, add, maximum = np.matmul, np.add, np.maximum
        h = self._input
        for w_t, b, out in self._hidden:
            matmul(h, w_t, out=out)
            add(out, b, out=out)
            maximum(out, 0.0, out=out)
            h = out
        w_t, b, out = self._last
        matmul(h, w_t, out=out)
        add(out, b, out=out)
        return out

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q-values of one observation (any shape with ``obs_dim`` elements), as a new array."""
        np.copyto(self._input, np.reshape(obs, -1), casting="unsafe")
        return self.forward_input().copy()

    def act(self, obs: np.ndarray) -> int:
        """Greedy action of one observation; allocates nothing beyond the returned int."""
        np.copyto(self._input, np.reshape(obs, -1), casting="unsafe")
        return int(self.forward_input().argmax())
