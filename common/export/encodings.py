"""How the weight matrices of an exported MLP are stored, and how they decode to float32.

All weights of a policy share one encoding and are concatenated into a few flat arrays
(row-major, layer after layer), because per-array bookkeeping would eat much of what
int8 saves on a 64-64 network. Every encoding decodes to float32 at load time: the
runner then runs the same fast float32 forward whatever the file, so the encodings shrink
what is shipped and stored (flash, download), not the few kilobytes of RAM used to act.

- ``fp32``: weights and biases as float32; the reference.
- ``fp16``: weights and biases as float16 (half the bytes; ~3 significant digits).
- ``int8``: symmetric per-output-channel quantisation, ``w ≈ q * scale[row]`` with
  integer ``q`` in [-127, 127] and ``scale = max|row| / 127``; scales and biases as
  float16. :func:`encode` takes the nearest ``q``; :mod:`common.export.calibrate` picks
  the ``q`` (and biases) that best reproduce the network's outputs, in the same format.
  Per-channel scales keep a row of small weights from being rounded to zero by one
  large weight elsewhere in the matrix. Done in numpy on purpose:
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
deviations get scales of their own. The hidden layers' rounding errors still reach the
gaps; calibrated rounding is what removes most of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ENCODINGS = ("fp32", "fp16", "int8", "sparse")
LOSSY = ("fp16", "int8")  # encodings that round weights and store the output layer centred
INT8_MAX = 127
_FP16_MAX = float(np.finfo(np.float16).max)

Layer = tuple[np.ndarray, np.ndarray]  # (weight (out, in), bias (out,)), float32


def stored_shapes(layer_sizes: Sequence[int], encoding: str) -> list[tuple[int, int]]:
    """(rows, in) of each stored weight matrix of an MLP with these widths (input first):
    one row per output unit, plus the mean row of a centred output layer."""
    shapes = [(layer_sizes[i + 1], layer_sizes[i]) for i in range(len(layer_sizes) - 1)]
    if encoding in LOSSY:
        shapes[-1] = (shapes[-1][0] + 1, shapes[-1][1])
    return shapes


def stored_layers(layers: Sequence[Layer], encoding: str) -> list[Layer]:
    """``layers`` (float32) as ``encoding`` stores them: a lossy encoding's output layer
    centred (mean row and mean bias first, then each action's deviation from them)."""
    layers = [(np.asarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32).reshape(-1))
              for w, b in layers]
    if encoding in LOSSY:
        for w, b in layers:
            _check_fp16_range(b, "biases")
            if encoding == "fp16":
                _check_fp16_range(w, "weights")
            else:  # the file stores int8 levels and float16 scales of max|row| / 127
                _check_fp16_range(w / INT8_MAX, "int8 weight scales")
        w, b = layers[-1]
        mean_w, mean_b = w.mean(axis=0, keepdims=True), b.mean(keepdims=True)
        layers[-1] = (np.concatenate([mean_w, w - mean_w]), np.concatenate([mean_b, b - mean_b]))
    return layers


def int8_row_scales(w: np.ndarray) -> np.ndarray:
    """One symmetric scale per row, ``max|row| / 127``, as the float16 the file stores."""
    return (np.abs(w).max(axis=1) / INT8_MAX).astype(np.float16).astype(np.float32)


def to_grid(w: np.ndarray, encoding: str, row_scales: np.ndarray | None = None) -> np.ndarray:
    """The values nearest to ``w`` (rows = output units; a single column works too) that
    ``encoding`` can store: float16 values, or ``q * row_scale`` with integer ``q`` in
    [-127, 127] for int8 (all-zero rows stay zero)."""
    if encoding == "fp16":
        return np.asarray(w).astype(np.float16).astype(np.float32)
    if encoding == "int8":
        if row_scales is None:
            raise ValueError("int8 rounding needs the rows' scales")
        return (_int8_levels(w, row_scales) * _per_row(row_scales, w)).astype(np.float32)
    raise ValueError(f"{encoding!r} is not a lossy encoding; lossy ones are {LOSSY}")


def _check_fp16_range(values: np.ndarray, what: str) -> None:
    """Refuse values float16 would store as infinity (a file no reader would accept),
    before any rounding: calibrated rounding would otherwise turn them into NaN."""
    largest = float(np.abs(values).max(initial=0.0))
    if largest > _FP16_MAX:
        raise ValueError(f"{what} reach {largest:.4g}, beyond the float16 range "
                         f"(|x| <= {_FP16_MAX:g}) the file stores them in; export as fp32")


def _per_row(row_scales: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``row_scales`` shaped to broadcast over ``w``'s rows (a matrix or one column)."""
    return row_scales.reshape((-1,) + (1,) * (np.ndim(w) - 1))


def _int8_levels(w: np.ndarray, row_scales: np.ndarray) -> np.ndarray:
    """Integer levels in [-127, 127] (as floats) nearest to ``w / row_scale``."""
    scales = _per_row(row_scales, w)
    return np.clip(np.rint(w / np.where(scales > 0, scales, 1)), -INT8_MAX, INT8_MAX)


def encode(layers: Sequence[Layer], encoding: str) -> dict[str, np.ndarray]:
    """The flat arrays that store ``layers`` in ``encoding``, lossy ones rounded to the
    nearest storable value (:mod:`common.export.calibrate` rounds better)."""
    stored = stored_layers(layers, encoding)
    scales = [int8_row_scales(w) for w, _ in stored] if encoding == "int8" else None
    return pack(stored, encoding, scales)


def pack(stored: Sequence[Layer], encoding: str,
         row_scales: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The flat arrays of layers already in :func:`stored_layers` form; int8 needs each
    matrix's row scales. Values already on the grid (:func:`to_grid`) are stored exactly."""
    weights = [np.asarray(w, dtype=np.float32) for w, _ in stored]
    flat_w = np.concatenate([w.reshape(-1) for w in weights])
    flat_b = np.concatenate([np.asarray(b, dtype=np.float32).reshape(-1) for _, b in stored])
    if encoding == "fp32":
        return {"weights": flat_w, "biases": flat_b}
    if encoding == "fp16":
        return {"weights": flat_w.astype(np.float16), "biases": flat_b.astype(np.float16)}
    if encoding == "int8":
        if row_scales is None:
            raise ValueError("int8 packing needs each matrix's row scales")
        scales = np.concatenate(list(row_scales)).astype(np.float16)
        q = np.concatenate([_int8_levels(w, s).reshape(-1)
                            for w, s in zip(weights, row_scales, strict=True)])
        return {"weights": q.astype(np.int8), "scales": scales,
                "biases": flat_b.astype(np.float16)}
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
    if encoding in LOSSY:
        w, b = layers[-1]
        layers[-1] = (w[1:] + w[:1], b[1:] + b[0])
    return layers
