"""What leaves the device, written down: a Flower mod that records every outgoing message.

With ``message-audit-dir`` set (a device's node config; in the simulation engine, whose
devices have no node config of their own, also the run config), each message this ClientApp sends
(train and evaluate replies, errors included) is summarised into one JSON file in that
directory: the message type, its serialized size in bytes, the error if any, and for
each record its kind and content: array names with shapes and dtypes (never their
values), every metric (they are scalars or short lists by design), config keys with
their value types. It is the
outermost mod, so it sees the message exactly as it leaves, after every other mod (e.g.
central DP clipping, the flat wire format's packing: :mod:`client.flat_wire_mod`). A
packed ArrayRecord travels as one flat array; the audit lists the tensors its layout
says it carries (names, shapes, dtype: what the server can read from it) and the flat
array itself under ``packed-as``. ``tests/test_privacy_federation.py`` uses it to check that only
Q-network weights and scalar metrics ever leave a device, with and without DP; an
operator can use it to audit a real device. A deployed device ignores the run config's
``message-audit-dir``: the server would otherwise pick where the device writes on its own
disk.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedq.common import flat_wire
from fedq.common.atomic import atomic_write_text

CONFIG_KEY = "message-audit-dir"


def message_audit_mod(msg: Message, context: Context,
                      call_next: ClientAppCallable) -> Message:
    """Pass the message on; summarise the reply into ``message-audit-dir`` if set."""
    reply = call_next(msg, context)
    directory = audit_directory(context)
    if directory:
        summary = {"message-type": msg.metadata.message_type, "node-id": context.node_id,
                   "partition-id": context.node_config.get("partition-id"),
                   "serialized-bytes": serialized_bytes(reply), **summarise(reply)}
        path = Path(directory) / f"{uuid.uuid4().hex}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary))
    return reply


def audit_directory(context: Context) -> str:
    """Where this device writes its audit: its node config's ``message-audit-dir``, or,
    only for a simulated device (its node config has a ``partition-id``), the run
    config's; empty for none."""
    node = context.node_config
    simulated = "partition-id" in node
    return str(node.get(CONFIG_KEY)
               or (context.run_config.get(CONFIG_KEY) if simulated else "") or "")


def serialized_bytes(message: Message) -> int:
    """Size of the message as the SuperNode pushes it: every object of its tree (the
    message, its records, each array) in Flower's serialized form."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def summarise(message: Message) -> dict[str, Any]:
    """The error, and a description of every record, of one message."""
    if message.has_error():
        return {"error": {"code": message.error.code, "reason": message.error.reason},
                "records": {}}
    content = message.content
    packed = flat_wire.packed_tensors(content) if flat_wire.is_packed(content) else {}
    records: dict[str, Any] = {}
    for name, record in content.items():
        if name == flat_wire.LAYOUT_RECORD:
            records[name] = {"kind": "flat-layout", "packs": sorted(packed)}
        elif isinstance(record, ArrayRecord):
            described = {key: {"shape": list(array.shape), "dtype": array.dtype}
                         for key, array in record.items()}
            records[name] = {"kind": "arrays", "arrays": described} if name not in packed \
                else {"kind": "arrays", "packed-as": described, "arrays": {
                    key: {"shape": list(tensor.shape), "dtype": str(tensor.dtype)}
                    for key, tensor in packed[name].items()}}
        elif isinstance(record, MetricRecord):
            records[name] = {"kind": "metrics", "metrics": dict(record)}
        elif isinstance(record, ConfigRecord):
            records[name] = {"kind": "config", "types": {
                key: type(value).__name__ for key, value in record.items()}}
        else:
            records[name] = {"kind": type(record).__name__}
    return {"error": None, "records": records}
