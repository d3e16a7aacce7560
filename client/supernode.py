"""``fedq-supernode``: Flower's own ``flower-supernode``, polling for messages promptly.

Flower 1.42's SuperNode waits between the steps of a message's round trip with fixed
sleeps, in ``flwr/supernode/start_client_internal.py``: 3 s after every pull of the
SuperLink that found no message (``time.sleep(3)`` in the main loop), 0.5 s while it
waits for the ClientApp's reply and for each of its objects (``_push_messages``); its
SuperExec, which starts a ClientApp process for each message, looks for new work every
1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, ``flwr/supercore/superexec/
run_superexec.py``). A message sent just after a pull waits up to 3 s before the device
even sees it, and a deployed round paid that twice per message.

This entry point runs the unmodified ``flower-supernode`` (same flags, same node config,
same processes) with those waits capped at ``FEDQ_SUPERNODE_POLL_S`` seconds (default
0.2): before Flower's CLI starts, the ``time`` module that ``start_client_internal``
sleeps with is replaced, in that module only, by one whose ``sleep`` is capped (every
other ``time`` function is the real one; connection retries and backoff elsewhere keep
Flower's own timing), and the SuperExec child inherits
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (unless already set). At 0.2 s an idle device
sends the SuperLink 5 small pull requests per second. For a window after each reply it
sent (``FEDQ_SUPERNODE_FAST_POLL_WINDOW_S``, default 1 s), when the round's next message
is due, it pulls every ``FEDQ_SUPERNODE_FAST_POLL_S`` (default 0.02 s) instead.

It also puts a ``flwr-clientapp`` of its own first on the ``PATH`` its SuperExec starts
ClientApp processes from (in ``$FLWR_HOME/fedq-bin``): the same Flower function, without
importing the SuperNode's CLI, database and web server in every message's process
(:mod:`client.clientapp_launcher`).

Unless ``FEDQ_WARM_EXECUTOR=0``, it runs the SuperNode with ``--isolation process`` and
fedq's warm executor (:mod:`client.warm_executor`) in place of Flower's SuperExec: one
fork server per device, imports paid once, a forked child per message; the hand-offs
between the SuperNode, the task loop and that child are then rung, not polled
(:mod:`client.handoff`).

Either way its ClientApps give up a message whose objects have not arrived within
``FEDQ_MESSAGE_PULL_LIMIT_S`` (default 300 s; :func:`client.clientapp_launcher.bound_message_pull`)
instead of waiting up to Flower's 2 hours, unwatched, for a message of a stopped run.

    fedq-supernode --superlink 127.0.0.1:9092 --insecure --node-config "..."
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from fedq.client import env_settings, handoff, warm_executor
from fedq.client.clientapp_launcher import message_pull_limit, write_launcher
from fedq.common import hop_trace, prompt_pulls

POLL_ENV = "FEDQ_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.2
MAX_POLL_S = 3.0  # Flower's own longest wait: a cap above it changes nothing
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's, read by its SuperExec


FAST_POLL_ENV = "FEDQ_SUPERNODE_FAST_POLL_S"  # the SuperLink poll right after a reply
DEFAULT_FAST_POLL_S = 0.02
FAST_WINDOW_ENV = "FEDQ_SUPERNODE_FAST_POLL_WINDOW_S"  # for how long after it (0: never)
DEFAULT_FAST_WINDOW_S = 1.0
MAX_FAST_WINDOW_S = 60.0


def poll_interval(environ: Mapping[str, str]) -> float:
    """``FEDQ_SUPERNODE_POLL_S`` in seconds (default 0.2); refuses anything but a number
    in [0.01, 3], naming the variable."""
    return env_settings.seconds(environ, POLL_ENV, DEFAULT_POLL_S, 0.01, MAX_POLL_S)


def burst(environ: Mapping[str, str]) -> handoff.Burst | None:
    """The SuperLink polling burst after each reply (:class:`client.handoff.Burst`):
    every ``FEDQ_SUPERNODE_FAST_POLL_S`` (default 0.02, in [0.01, 3]) for
    ``FEDQ_SUPERNODE_FAST_POLL_WINDOW_S`` (default 1, in [0, 60]; 0 turns it off);
    refuses other values, naming the variable."""
    window = env_settings.seconds(environ, FAST_WINDOW_ENV, DEFAULT_FAST_WINDOW_S, 0.0,
                                  MAX_FAST_WINDOW_S)
    fast = env_settings.seconds(environ, FAST_POLL_ENV, DEFAULT_FAST_POLL_S, 0.01, MAX_POLL_S)
    return handoff.Burst(fast, window) if window > 0 else None


def cap_polling(cap: float, environ: dict[str, str] | os._Environ[str] = os.environ,
                bells: handoff.Bells | None = None, fast: handoff.Burst | None = None
                ) -> None:
    """Cap the SuperNode's waits (and its SuperExec's, through ``environ``) at ``cap`` s,
    and at ``fast``'s interval for its window after each reply it sent; with the warm
    executor's ``bells``, its wait for a reply ends when the ClientApp child rings, and
    it rings the task loop when it has stored a message (:mod:`client.handoff`)."""
    from flwr.supernode import start_client_internal

    handoff.sleep_until_rung(start_client_internal, bells.reply if bells else None, cap,
                             fast)
    handoff.ring_after_store(start_client_internal, bells.task if bells else None, fast)
    prompt_pulls.apply(start_client_internal)  # the weights it pulls from the SuperLink
    environ.setdefault(SUPEREXEC_POLL_ENV, f"{cap:g}")


def use_clientapp_launcher(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """Put the lean ``flwr-clientapp`` (:mod:`client.clientapp_launcher`) first on
    ``environ``'s ``PATH``; returns its directory."""
    home = Path(environ.get("FLWR_HOME") or Path.home() / ".flwr")
    directory = write_launcher(home / "fedq-bin").parent
    environ["PATH"] = os.pathsep.join([str(directory), environ.get("PATH", "")])
    return directory


def main() -> None:
    """Start ``flower-supernode`` with this process's arguments, capped polling and
    fedq's warm ClientApp executor (or, with ``FEDQ_WARM_EXECUTOR=0``, Flower's SuperExec
    with the lean ClientApp launcher)."""
    try:
        cap = poll_interval(os.environ)
        fast = burst(os.environ)
        warm = warm_executor.enabled(os.environ)
        message_pull_limit(os.environ)  # read again by each ClientApp
    except ValueError as err:
        sys.exit(f"fedq-supernode: error: {err}")
    if hop_trace.enabled():  # this device's processes say whose they are
        os.environ[hop_trace.NODE_ENV] = str(os.getpid())
    if warm:
        bells = handoff.Bells.make()
        cap_polling(cap, bells=bells, fast=fast)  # first: the fork server inherits its env
        warm_executor.start_for_supernode(bells)
    else:
        cap_polling(cap, fast=fast)
        use_clientapp_launcher()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
