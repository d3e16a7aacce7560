"""A ClientApp fetches its message's objects without a 1 s first retry wait.

Flower 1.42's ``run_clientapp`` pulls the message it runs from its SuperNode with
``pull_and_inflate_object_from_tree``, whose retries start at ``PULL_INITIAL_BACKOFF`` =
1 s (``flwr/supercore/constant.py``; doubling up to 10 s). The SuperNode launches the
ClientApp as soon as it has stored the message, while it may still be pulling the
message's objects (the weights) from the SuperLink; the ClientApp's first pull of an
object that has not arrived yet then waits a whole second although the object arrives
milliseconds later. Measured with per-call timestamps in bench_deployment (numpy, fused,
local-steps 2000, load ~5 on 2 cores): 6 of 18 ClientApp processes spent 0.9-1.24 s
in ``pull_task_input`` (median 0.08 s), about a second of a 2.5 s round for the device
the round waited on.

:func:`apply` makes that pull retry after :data:`INITIAL_BACKOFF_S` instead, doubling up
to Flower's own cap, with Flower's own limits on tries and total time: a slow link still
waits as long before giving up, a fast one no longer sleeps while its object is ready.
"""

from __future__ import annotations

import functools
from types import ModuleType

INITIAL_BACKOFF_S = 0.02  # a loopback/LAN SuperNode stores an object within milliseconds


def apply(run_clientapp_module: ModuleType) -> None:
    """Give ``flwr.supernode.runtime.run_clientapp``'s object pulls a short first retry
    wait (in that module only; idempotent)."""
    pull = run_clientapp_module.pull_and_inflate_object_from_tree
    if isinstance(pull, functools.partial):
        return
    run_clientapp_module.pull_and_inflate_object_from_tree = functools.partial(
        pull, initial_backoff=INITIAL_BACKOFF_S)
