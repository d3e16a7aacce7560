"""How the weight matrices of an exported MLP are stored, and how they decode to float32.

All weights of a policy share one encoding and are concatenated into a few flat arrays
(row-major, layer after layer), because per-array bookkeeping would eat much of what
int8 saves on a 64-64 network. Every encoding decodes to float32 at load time: the
runner then runs the same fast float32 forward whatever the file, so the encodings shrink
what is shipped and stored (flash, download), not the few kilobytes of RAM used to act.

- ``fp32``: weights and biases as float32; the reference.
- ``fp16``: weights and biases as float16 (half the bytes; ~3 significant digits).
- ``int8``: symmetric per-output-channel quantisation, ``w ≈ q * scale[row]`` with
  ``q = round(w / scale)`` in [-127, 127] and ``scale = max|row| / 127``; scales and
  biases as float16. Per-channel scales keep a row of small weights from being rounded
  to zero by one large weight elsewhere in the matrix. Done in numpy on purpose:
  ``torch.ao.quantization`` is deprecated in torch 2.13 (it warns that it will be
  removed and points to torchao), and its quantised modules would need torch on the device.
- ``sparse``: for magnitude-pruned networks: a bit mask of the non-zero weights
  (``np.packbits``) plus their float32 values; biases as float32.

The lossy encodings (fp16, int8) store the output layer *centred*: its mean row and mean
bias, then each action's deviation from them. A DQN's Q-values share a large state value
(~100 on CartPole) and differ by small action gaps (often < 0.1); rounding each action's
row and bias on its own adds errors of the value's scale (fp16 resolves 100 only to
0.06) that flip the greedy action in a quarter of the states. Rounding errors of the
mean row shift every action's Q-value alike and cannot change the argmax, and the small
deviations get scales of their own, so the greedy action survives quantisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ENCODINGS = ("fp32", "fp16", "int8", "sparse")
_CENTRED = ("fp16", "int8")  # encodings that store the output layer centred
INT8_MAX = 127

Layer = tuple[np.ndarray, np.ndarray]  # (weight (out, in), bias (out,)), float32


def stored_shapes(layer_sizes: Sequence[int], encoding: str) -> list[tuple[int, int]]:
    """(rows, in) of each stored weight matrix of an MLP with these widths (input first):
    one row per output unit, plus the mean row of a centred output layer."""
    shapes = [(layer_sizes[i + 1], layer_sizes[i]) for i in range(len(layer_sizes) - 1)]
    if encoding in _CENTRED:
        shapes[-1] = (shapes[-1][0] + 1, shapes[-1][1])
    return shapes


def encode(layers: Sequence[Layer], encoding: str) -> dict[str, np.ndarray]:
    """The flat arrays that store ``layers`` in ``encoding``."""
    if encoding in _CENTRED:
        w, b = (np.asarray(a, dtype=np.float32) for a in layers[-1])
        mean_w, mean_b = w.mean(axis=0, keepdims=True), b.mean(keepdims=True)
        layers = [*layers[:-1], (np.concatenate([mean_w, w - mean_w]),
                                 np.concatenate([mean_b, b - mean_b]))]
    weights = [np.asarray(w, dtype=np.float32) for w, _ in layers]
    flat_w = np.concatenate([w.reshape(-1) for w in weights])
    flat_b = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1) for _, b in layers])
    if encoding == "fp32":
        return {"weights": flat_w, "biases": flat_b}
    if encoding == "fp16":
        return {"weights": flat_w.astype(np.float16), "biases": flat_b.astype(np.float16)}
    if encoding == "int8":
        scales = np.concatenate([np.abs(w).max(axis=1) / INT8_MAX for w in weights])
        scales = scales.astype(np.float16)
        row_scales = _per_weight(scales, [w.shape for w in weights])
        q = np.rint(flat_w / np.where(row_scales > 0, row_scales, 1))  # all-zero rows stay 0
        return {"weights": np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8),
                "scales": scales, "biases": flat_b.astype(np.float16)}
    if encoding == "sparse":
        mask = flat_w != 0
        return {"mask": np.packbits(mask), "weights": flat_w[mask], "biases": flat_b}
    raise ValueError(f"unknown weight encoding {encoding!r}; choose one of {ENCODINGS}")


def _per_weight(row_values: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Repeat one value per output row over that row's weights (flat, row-major)."""
    widths = np.concatenate([np.full(out_dim, in_dim) for out_dim, in_dim in shapes])
    return np.repeat(row_values.astype(np.float32), widths)


def array_specs(layer_sizes: Sequence[int], encoding: str, n_nonzero: int | None = None
                ) -> dict[str, tuple[np.dtype, int]]:
    """dtype and length each stored array must have: what a reader checks before decoding.

    For ``sparse`` the number of stored values is the mask's popcount, which the caller
    passes as ``n_nonzero`` once the mask is known.
    """
    shapes = stored_shapes(layer_sizes, encoding)
    n_w = sum(o * i for o, i in shapes)
    n_rows = sum(o for o, _ in shapes)
    if encoding == "fp32":
        return {"weights": (np.dtype(np.float32), n_w), "biases": (np.dtype(np.float32), n_rows)}
    if encoding == "fp16":
        return {"weights": (np.dtype(np.float16), n_w), "biases": (np.dtype(np.float16), n_rows)}
    if encoding == "int8":
        return {"weights": (np.dtype(np.int8), n_w), "scales": (np.dtype(np.float16), n_rows),
                "biases": (np.dtype(np.float16), n_rows)}
    if encoding == "sparse":
        specs = {"mask": (np.dtype(np.uint8), -(-n_w // 8)),
                 "biases": (np.dtype(np.float32), n_rows)}
        if n_nonzero is not None:
            specs["weights"] = (np.dtype(np.float32), n_nonzero)
        return specs
    raise ValueError(f"unknown weight encoding {encoding!r}; choose one of {ENCODINGS}")


def decode(arrays: dict[str, np.ndarray], layer_sizes: Sequence[int], encoding: str
           ) -> list[Layer]:
    """Float32 ``(weight (out, in), bias)`` pairs from arrays :func:`encode` produced
    (already checked against :func:`array_specs`)."""
    shapes = stored_shapes(layer_sizes, encoding)
    biases = arrays["biases"].astype(np.float32)
    if encoding in ("fp32", "fp16"):
        flat_w = arrays["weights"].astype(np.float32)
    elif encoding == "int8":
        flat_w = arrays["weights"].astype(np.float32) * _per_weight(arrays["scales"], shapes)
    elif encoding == "sparse":
        n_w = sum(o * i for o, i in shapes)
        mask = np.unpackbits(arrays["mask"], count=n_w).astype(bool)
        flat_w = np.zeros(n_w, dtype=np.float32)
        flat_w[mask] = arrays["weights"]
    else:
        raise ValueError(f"unknown weight encoding {encoding!r}; choose one of {ENCODINGS}")
    layers, w_at, b_at = [], 0, 0
    for out_dim, in_dim in shapes:
        w = flat_w[w_at:w_at + out_dim * in_dim].reshape(out_dim, in_dim)
        layers.append((np.ascontiguousarray(w), biases[b_at:b_at + out_dim].copy()))
        w_at += out_dim * in_dim
        b_at += out_dim
    if encoding in _CENTRED:
        w, b = layers[-1]
        layers[-1] = (w[1:] + w[:1], b[1:] + b[0])
    return layers
