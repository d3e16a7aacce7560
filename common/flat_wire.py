"""Q-network weights on the wire as one flat array, not one Flower object per tensor.

Flower 1.42 moves a Message as a tree of objects (the message, its RecordDict, each
record, each Array and each Array's chunk), and every hop of a deployed round (ServerApp
-> SuperLink -> SuperNode -> ClientApp and back) pushes or pulls each object with its
own gRPC call, two at a time. For fedq's small Q-networks the calls, not the bytes, are
the cost: a 4-64-64-2 MLP is 6 tensors, so 12 of a train message's 16 objects (about
20 KB in all) are its arrays. Measured on the deployed round (bench_deployment, hop
trace; docs/benchmarks.md "One flat array per message"): each object-moving hop took
0.1-0.16 s whatever the bytes.

:func:`pack` replaces every ArrayRecord of a message's content that holds two or more
numpy arrays of one dtype by an ArrayRecord with one 1-D array (key :data:`FLAT_KEY`),
the tensors concatenated in the record's order, and describes them in one ConfigRecord
(:data:`LAYOUT_RECORD`): for record ``R``, ``R.names`` (its keys in order), ``R.ranks``
(each tensor's number of dimensions), ``R.shapes`` (their dimensions, concatenated) and
``R.dtype``. A train message is then 6 objects instead of 16, its reply 8 instead of 17.
:func:`unpack` restores the records bit for bit and checks the layout first: a field
that is missing, of the wrong type, or inconsistent with the flat array raises
:class:`WireFormatError` naming the field. Records that do not fit (one array, mixed
dtypes, e.g. the int8 update compression's payload) travel as they are.

Both ends agree without negotiation: the ServerApp packs what it sends
(:mod:`server.prompt_grid`), a device unpacks what it receives and packs its reply only
when the message it answers came packed (:mod:`client.flat_wire_mod`), so a device
answers a server that does not pack in the form it was asked. No torch here: the numpy
backend's devices use it too.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedq.common.weights import WeightsError

LAYOUT_RECORD = "fedq.flat-layout"  # the ConfigRecord describing the packed records
FLAT_KEY = "flat"  # the one array of a packed ArrayRecord
_FIELDS = ("names", "ranks", "shapes", "dtype")
_MAX_RANK = 32  # numpy's limit


class WireFormatError(WeightsError):
    """A packed message's layout does not describe its flat array."""


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` carries packed records (has a :data:`LAYOUT_RECORD`)."""
    return LAYOUT_RECORD in content


def pack(content: RecordDict) -> RecordDict:
    """``content`` with each packable ArrayRecord flattened and their layout added
    (``content`` itself if none is packable). Raises ValueError if ``content`` already
    has a record named :data:`LAYOUT_RECORD`."""
    if is_packed(content):
        raise ValueError(f"content already has a record named '{LAYOUT_RECORD}'")
    layout: dict[str, str | list[str] | list[int]] = {}
    packed: dict[str, ArrayRecord] = {}
    for name, record in content.array_records.items():
        arrays = _packable(record)
        if arrays is None:
            continue
        packed[name] = ArrayRecord({FLAT_KEY: Array(np.concatenate(
            [a.ravel() for a in arrays.values()]))})
        layout[f"{name}.names"] = list(arrays)
        layout[f"{name}.ranks"] = [a.ndim for a in arrays.values()]
        layout[f"{name}.shapes"] = [int(d) for a in arrays.values() for d in a.shape]
        layout[f"{name}.dtype"] = str(next(iter(arrays.values())).dtype)
    if not packed:
        return content
    out = RecordDict({name: packed.get(name, record) for name, record in content.items()})
    out[LAYOUT_RECORD] = ConfigRecord(layout)  # type: ignore[arg-type]
    return out


def unpack(content: RecordDict) -> RecordDict:
    """``content`` with every packed record restored to its tensors and the layout
    record removed (``content`` itself if it is not packed); raises
    :class:`WireFormatError` naming the field if the layout does not fit."""
    if not is_packed(content):
        return content
    tensors = packed_tensors(content)
    out = RecordDict({name: record for name, record in content.items()
                      if name != LAYOUT_RECORD})
    for name, arrays in tensors.items():
        out[name] = ArrayRecord({key: Array(array) for key, array in arrays.items()})
    return out


def packed_tensors(content: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """Per packed record, its tensors (name -> array, views of the flat array) as the
    layout describes them, after checking the layout field by field."""
    layout = content[LAYOUT_RECORD]
    if not isinstance(layout, ConfigRecord):
        raise WireFormatError(f"record '{LAYOUT_RECORD}' is a {type(layout).__name__}, "
                              "expected a ConfigRecord")
    records = sorted({key.rpartition(".")[0] for key in layout})
    expected = {f"{r}.{f}" for r in records for f in _FIELDS}
    if set(layout) != expected:
        wrong = sorted(set(layout) ^ expected)
        raise WireFormatError(f"layout field(s) {wrong} in '{LAYOUT_RECORD}': each packed "
                              f"record R needs exactly {['R.' + f for f in _FIELDS]}")
    return {record: _tensors(content, layout, record) for record in records}


def _tensors(content: RecordDict, layout: ConfigRecord,
             record: str) -> dict[str, np.ndarray]:
    names = _list_field(layout, f"{record}.names", str)
    ranks = _list_field(layout, f"{record}.ranks", int)
    shapes = _list_field(layout, f"{record}.shapes", int)
    dtype = layout[f"{record}.dtype"]
    _check(len(set(names)) == len(names) and all(names), f"{record}.names",
           f"must be distinct non-empty names, got {names}")
    _check(len(ranks) == len(names) and all(0 <= r <= _MAX_RANK for r in ranks),
           f"{record}.ranks", f"must give a rank in [0, {_MAX_RANK}] for each of the "
           f"{len(names)} names, got {ranks}")
    _check(len(shapes) == sum(ranks) and all(d >= 0 for d in shapes), f"{record}.shapes",
           f"must list {sum(ranks)} non-negative dimensions (the ranks' sum), got {shapes}")
    flat = _flat_array(content, record)
    _check(isinstance(dtype, str) and dtype == str(flat.dtype), f"{record}.dtype",
           f"is {dtype!r} but the flat array's dtype is {flat.dtype}")
    dims, at = [], 0
    for rank in ranks:
        dims.append(tuple(shapes[at:at + rank]))
        at += rank
    sizes = [math.prod(d) for d in dims]
    _check(sum(sizes) == flat.size, f"{record}.shapes",
           f"describes {sum(sizes)} values but the flat array '{record}' has {flat.size}")
    tensors, offset = {}, 0
    for name, shape, size in zip(names, dims, sizes, strict=True):
        tensors[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return tensors


def _flat_array(content: RecordDict, record: str) -> np.ndarray:
    """The one 1-D numpy array of packed record ``record``."""
    arrays = content.get(record)
    _check(isinstance(arrays, ArrayRecord) and list(arrays) == [FLAT_KEY], record,
           f"must be an ArrayRecord with the one key '{FLAT_KEY}', the layout in "
           f"'{LAYOUT_RECORD}' describes it")
    try:
        flat = arrays[FLAT_KEY].numpy()
    except (TypeError, ValueError) as err:
        raise WireFormatError(f"record '{record}': its '{FLAT_KEY}' array cannot be read "
                              f"as numpy ({err})") from None
    _check(flat.ndim == 1, record, f"'{FLAT_KEY}' must be 1-D, got shape {flat.shape}")
    return flat


def _list_field(layout: ConfigRecord, field: str, kind: type) -> list:
    value = layout[field]
    _check(isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool)
                                           for v in value),
           field, f"must be a list of {kind.__name__}, got {value!r}")
    return value  # type: ignore[return-value]


def _check(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise WireFormatError(f"flat wire format: field '{field}' {problem}")


def _packable(record: ArrayRecord) -> dict[str, np.ndarray] | None:
    """The record's arrays if it is worth packing (two or more numpy arrays of one
    dtype), else None."""
    if len(record) < 2 or any(a.stype != "numpy.ndarray" for a in record.values()) \
            or len({a.dtype for a in record.values()}) != 1:
        return None
    return {key: array.numpy() for key, array in record.items()}
