"""The device's end of the flat wire format (:mod:`common.flat_wire`), as a Flower mod.

A message that arrives packed is unpacked before any other mod or handler sees it, so
they all work on the Q-network's tensors by name as before; the reply is packed on the
way out only when the message it answers came packed, so a server that sends tensors
one by one gets them back the same way. The mod sits just inside the message audit
(:mod:`client.message_audit`), which therefore records the reply as it leaves: packed.
A malformed layout raises :class:`common.flat_wire.WireFormatError` naming the field,
which Flower returns to the server as the ClientApp's error reply; nothing is trained.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedq.common import flat_wire


def flat_wire_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack ``msg`` if packed, run the rest, pack the reply the same way."""
    packed = msg.has_content() and flat_wire.is_packed(msg.content)
    if packed:
        msg.content = flat_wire.unpack(msg.content)
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = flat_wire.pack(reply.content)
    return reply
