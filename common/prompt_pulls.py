"""Object pulls that retry within milliseconds, not after Flower's 1 s first backoff.

Flower 1.42 moves a message in two steps: the message (its metadata and object tree),
then its objects (the weights). Whoever pulls sees the message as soon as it is stored
and pulls its objects with ``pull_objects`` (``flwr/supercore/inflatable/
inflatable_utils.py``), whose retries of an object not stored yet start at
``PULL_INITIAL_BACKOFF`` = 1 s and double up to 10 s. On a loopback or LAN deployment
the object is stored milliseconds later, but the puller sleeps the whole second, on
every hop of a round:

* a ClientApp (``run_clientapp.pull_and_inflate_object_from_tree``): the SuperNode
  stores the message, and its task is launched, before it has pulled the weights from
  the SuperLink;
* the ServerApp (``http_grid.pull_messages``): the SuperLink hands out a reply as soon
  as the SuperNode sent it, before the SuperNode pushed the reply's objects;
* a SuperNode (``start_client_internal``), pulling a message the ServerApp is still
  pushing.

Measured with per-call timestamps in bench_deployment (numpy, fused, local-steps 2000,
load 2-5 on 2 cores): 6 of 18 ClientApps spent 0.9-1.24 s pulling their message
(median 0.08 s), and the ServerApp received the replies 1.1 s after the last device had
sent its reply, in rounds of ~2.5 s.

:func:`apply` gives a module's ``pull_objects`` / ``pull_and_inflate_object_from_tree``
a first retry wait of :data:`INITIAL_BACKOFF_S`, still doubling up to Flower's cap, with
Flower's own limits on tries and total time: a slow link waits about as long before it
gives up, a fast one no longer sleeps while its object is ready.
"""

from __future__ import annotations

import functools
from types import ModuleType

INITIAL_BACKOFF_S = 0.02  # a loopback/LAN peer stores an object within milliseconds
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


def apply(module: ModuleType) -> None:
    """Give the object pulls that ``module`` (a Flower module that imported them) makes a
    short first retry wait, in that module only; idempotent."""
    found = [name for name in PULL_FUNCTIONS if hasattr(module, name)]
    if not found:
        raise RuntimeError(f"{module.__name__} no longer pulls objects with "
                           f"{' or '.join(PULL_FUNCTIONS)}; fedq needs updating for this Flower")
    for name in found:
        pull = getattr(module, name)
        if not isinstance(pull, functools.partial):
            setattr(module, name, functools.partial(pull, initial_backoff=INITIAL_BACKOFF_S))
