"""The device's half of Flower's central DP with client-side clipping (``central-dp =
"client-fixed"``, :mod:`server.strategies`).

The server's ``DifferentialPrivacyClientSideFixedClipping`` puts the clipping norm in
every train message's config; Flower's ``fixedclipping_mod`` then scales this device's
update ``w_i - w_global`` to at most that norm before the reply leaves, and the server
adds Gaussian noise to the average. Flower's mod fails any message without the norm
(evaluate messages, or a server without client-side clipping), so this mod hands it only
the train messages that ask for clipping.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def central_dp_clipping_mod(msg: Message, context: Context,
                            call_next: ClientAppCallable) -> Message:
    """Clip the outgoing update with Flower's ``fixedclipping_mod`` when the server's
    round config carries a clipping norm; pass the message through otherwise."""
    configs = msg.content.config_records if msg.has_content() else {}
    if any(KEY_CLIPPING_NORM in record for record in configs.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
