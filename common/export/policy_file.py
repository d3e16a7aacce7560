"""The exported policy file: self-describing, checksummed, readable with numpy alone.

Layout (all integers little-endian)::

    b"FEDQPOL\\0"    8 bytes   magic: what the file is
    sha256          32 bytes  digest of every byte after it (header and payload)
    header length    4 bytes  uint32
    header                    UTF-8 JSON: format version, variant, env id, layer sizes,
                              weight encoding, the stored arrays (name, dtype, length)
                              and free-form provenance ("meta")
    payload                   the arrays' raw bytes, back to back, in the header's order

A device reads a file it may have received over a flaky link or kept on worn flash, or
that someone crafted, so :func:`read_policy` trusts nothing: a truncated file, a flipped
bit anywhere after the magic, a header that does not describe an MLP, arrays whose dtype
or length do not fit the layer sizes, or non-finite weights each raise
:class:`PolicyFileError` saying which. Memory and time stay bounded: the file may be at
most ``MAX_FILE_BYTES``, its header ``MAX_HEADER_BYTES`` and nested ``MAX_HEADER_DEPTH``
deep, and stored arrays have numeric dtypes of 1 to 8 bytes. The header's ``env_id``
must look like a gymnasium id (letters, digits, ``_ . / -``): gymnasium's
``module:EnvName`` form would import any installed module named in a file.
A custom container (not ``.npz``) because zip and ``.npy`` headers cost ~250 bytes per
array, a tenth of an int8 64-64 policy.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedq.common.atomic import atomic_open
from fedq.common.export.calibrate import encode_calibrated
from fedq.common.export.encodings import ENCODINGS, Layer, array_specs, decode, encode

MAGIC = b"FEDQPOL\0"
FORMAT_VERSION = 1
_PREFIX = len(MAGIC) + 32 + 4
MAX_FILE_BYTES = 256 << 20  # a 64-64 MLP is ~20 KB; a million-parameter fp32 one 4 MB
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 16
_ENV_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}")


class PolicyFileError(ValueError):
    """A policy file is missing, truncated, corrupted or does not describe an MLP policy."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"policy file '{path}': {problem}")
        self.path = Path(path)


@dataclass(frozen=True)
class Policy:
    """A loaded policy: float32 layers plus what the file says about them."""

    variant: str
    env_id: str
    layer_sizes: tuple[int, ...]
    encoding: str
    layers: list[Layer]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def obs_dim(self) -> int:
        return self.layer_sizes[0]

    @property
    def n_actions(self) -> int:
        return self.layer_sizes[-1]

    @property
    def n_parameters(self) -> int:
        return sum(w.size + b.size for w, b in self.layers)


def write_policy(path: Path, layers: Sequence[Layer], *, env_id: str, variant: str,
                 encoding: str, meta: dict[str, Any] | None = None,
                 calibration_states: np.ndarray | None = None) -> int:
    """Encode and write ``layers`` (float32 ``(weight (out, in), bias)``) atomically;
    returns the file size in bytes. With ``calibration_states`` (teacher states), fp16
    and int8 round to reproduce the network's outputs on them
    (:mod:`common.export.calibrate`); without, to the nearest storable values."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown weight encoding {encoding!r}; choose one of {ENCODINGS}")
    layer_sizes = [int(layers[0][0].shape[1])] + [int(w.shape[0]) for w, _ in layers]
    arrays = (encode(layers, encoding) if calibration_states is None
              else encode_calibrated(layers, encoding, calibration_states))
    header = {"format": "fedq-policy", "version": FORMAT_VERSION, "variant": variant,
              "env_id": env_id, "layer_sizes": layer_sizes, "encoding": encoding,
              "arrays": [{"name": k, "dtype": v.dtype.str, "length": int(v.size)}
                         for k, v in arrays.items()],
              "meta": meta or {}}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    body = struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(
        np.ascontiguousarray(v).tobytes() for v in arrays.values())
    data = MAGIC + hashlib.sha256(body).digest() + body
    with atomic_open(path) as fh:
        fh.write(data)
    return len(data)


def read_policy(path: Path | str) -> Policy:
    """Load and check a policy file; raises :class:`PolicyFileError` naming the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise PolicyFileError(path, f"cannot read: {err.strerror or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PolicyFileError(path, f"larger than {MAX_FILE_BYTES} bytes: not a policy")
    if len(data) < _PREFIX:
        raise PolicyFileError(path, f"truncated: {len(data)} bytes, shorter than the "
                                    f"{_PREFIX}-byte prefix of every policy file")
    if data[:len(MAGIC)] != MAGIC:
        raise PolicyFileError(path, "not a fedq policy file (wrong magic bytes)")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise PolicyFileError(path, _diagnose_mismatch(body))
    header_len = struct.unpack("<I", body[:4])[0]
    if header_len > min(MAX_HEADER_BYTES, len(body) - 4):
        raise PolicyFileError(path, f"header length {header_len} exceeds the file or the "
                                    f"{MAX_HEADER_BYTES}-byte limit")
    header = _parse_header(path, body[4:4 + header_len])
    arrays = _split_payload(path, header, body[4 + header_len:])
    layer_sizes = tuple(header["layer_sizes"])
    layers = decode(arrays, layer_sizes, header["encoding"])
    for i, (w, b) in enumerate(layers):
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise PolicyFileError(path, f"layer {i} holds NaN or Inf weights")
    return Policy(variant=header["variant"], env_id=header["env_id"], layer_sizes=layer_sizes,
                  encoding=header["encoding"], layers=layers, meta=header["meta"])


def _diagnose_mismatch(body: bytes) -> str:
    """Say "truncated" when the (intact) header declares more bytes than the file has."""
    try:
        header_len = struct.unpack("<I", body[:4])[0]
        if header_len > MAX_HEADER_BYTES:
            return "checksum mismatch: the file is corrupted"
        header = json.loads(body[4:4 + header_len])
        expected = 4 + header_len + sum(_array_dtype(a["dtype"]).itemsize * int(a["length"])
                                        for a in header["arrays"])
    except (struct.error, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return "checksum mismatch: the file is corrupted"
    if len(body) < expected:
        return (f"truncated: the header declares {expected + _PREFIX - 4} bytes, "
                f"the file has {len(body) + _PREFIX - 4}")
    return "checksum mismatch: the file is corrupted"


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError:
        raise PolicyFileError(path, "header is not valid JSON") from None
    except RecursionError:
        header = None
    if header is None or _depth(header) > MAX_HEADER_DEPTH:
        raise PolicyFileError(path, f"header nests deeper than {MAX_HEADER_DEPTH} levels")
    if not isinstance(header, dict) or header.get("format") != "fedq-policy":
        raise PolicyFileError(path, "header does not describe a fedq policy")
    if header.get("version") != FORMAT_VERSION:
        raise PolicyFileError(path, f"format version {header.get('version')!r} is not "
                                    f"supported (this reader knows {FORMAT_VERSION})")
    for key, kind in (("variant", str), ("env_id", str), ("encoding", str),
                      ("layer_sizes", list), ("arrays", list), ("meta", dict)):
        if not isinstance(header.get(key), kind):
            raise PolicyFileError(path, f"header field '{key}' is missing or not a "
                                        f"{kind.__name__}")
    if _ENV_ID.fullmatch(header["env_id"]) is None:
        raise PolicyFileError(path, f"header field 'env_id' {header['env_id'][:80]!r} is "
                                    "not a gymnasium id (letters, digits, '_', '.', '/', "
                                    "'-'; a 'module:' prefix would import code)")
    sizes = header["layer_sizes"]
    if len(sizes) < 2 or not all(isinstance(s, int) and s >= 1 for s in sizes):
        raise PolicyFileError(path, f"header field 'layer_sizes' must be >= 2 positive "
                                    f"integers, got {sizes}")
    if header["encoding"] not in ENCODINGS:
        raise PolicyFileError(path, f"header field 'encoding' is {header['encoding']!r}, "
                                    f"expected one of {ENCODINGS}")
    return header


def _split_payload(path: Path, header: dict[str, Any], payload: bytes) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    at = 0
    for entry in header["arrays"]:
        try:
            name, dtype, length = entry["name"], _array_dtype(entry["dtype"]), int(entry["length"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise PolicyFileError(path, f"header entry {str(entry)[:200]} in 'arrays' is "
                                        "malformed") from None
        n_bytes = dtype.itemsize * length
        if length < 0 or at + n_bytes > len(payload):
            raise PolicyFileError(path, f"array '{name}' runs past the end of the payload")
        arrays[name] = np.frombuffer(payload, dtype=dtype, count=length, offset=at)
        at += n_bytes
    if at != len(payload):
        raise PolicyFileError(path, f"{len(payload) - at} bytes after the last array")
    encoding = header["encoding"]
    n_nonzero = (int(np.unpackbits(arrays["mask"]).sum())
                 if encoding == "sparse" and "mask" in arrays else None)
    expected = array_specs(header["layer_sizes"], encoding, n_nonzero)
    if set(arrays) != set(expected):
        raise PolicyFileError(path, f"encoding '{encoding}' stores arrays "
                                    f"{sorted(expected)}, the file has {sorted(arrays)}")
    for name, (dtype, length) in expected.items():
        got = arrays[name]
        if got.dtype != dtype or got.size != length:
            raise PolicyFileError(path, f"array '{name}' is {got.dtype}[{got.size}], "
                                        f"expected {dtype}[{length}] for layer sizes "
                                        f"{header['layer_sizes']} and encoding '{encoding}'")
    return arrays


def _array_dtype(spec: object) -> np.dtype:
    """A stored array's dtype: numeric, 1 to 8 bytes (``V0`` and the like would make
    lengths meaningless); ValueError otherwise."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise ValueError(f"dtype {spec!r}")
    dtype = np.dtype(spec)
    if dtype.kind not in "fiu" or dtype.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"dtype {spec!r} is not a 1-8 byte number")
    return dtype


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_HEADER_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else (
            item if isinstance(item, list) else ())
        stack.extend((child, level + 1) for child in children)
    return deepest
