"""Replies as soon as they arrive, not up to 3 s later.

Flower 1.42's ``Grid.send_and_receive`` (superlink/grid/http_grid.py) sleeps 3 s between
pulls of the replies, so every train or evaluate phase of a deployed round ends up to 3 s
after its last reply: seconds of idle time per round that devices do not train. The
wrapper pulls with a short, growing interval instead (50 ms, then x1.5 up to 0.1 s),
which a ServerApp polling its own SuperLink can afford: at most 10 small requests a
second, and only while a phase waits for replies. (A 0.5 s cap, measured in
bench_deployment's per-call timestamps, let a reply wait up to 0.5 s in the SuperLink
after a round's slowest device had sent it, in a round of ~2.5 s.) The replies' objects
are pulled without Flower's 1 s first retry wait (:mod:`common.prompt_pulls`).

Even 0.1 s is, on average, 50 ms of every round in which a reply waits unseen: ~2 % of
a 2.4 s deployed round (bench_deployment's hop "ServerApp gets it (poll)"). Replies
are due at a predictable time: rounds of one phase (message type) last about as long
as the previous one, and a round's replies arrive close together. So the grid polls
every :data:`FAST_POLL_S` (20 ms) from :data:`DUE_SHARE` of the previous phase's wait
for its last reply, or from the first reply of this phase, whichever comes first, for
at most :data:`FAST_WINDOW_S`; a straggler beyond that is polled at the slow interval
again, so a stuck device costs the SuperLink 10 requests a second, not 50.

It is also the ServerApp's end of the flat wire format (:mod:`common.flat_wire`): every
message it pushes carries its weights as one flat array (unless the run config's
``flat-wire`` is false: devices then answer tensor by tensor), and every reply it pulls is
unpacked before the round loop sees it. A reply whose layout does not fit its array
becomes an error reply (code :data:`WIRE_FORMAT_ERROR_CODE`, the reason naming the
device and the field), which aggregation leaves out like any failed device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Error, Message
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.supercore import log
from flwr.superlink.grid import http_grid

from fedq.common import flat_wire, hop_trace, prompt_pulls

FIRST_POLL_S = 0.05
MAX_POLL_S = 0.1
FAST_POLL_S = 0.02  # while replies are due
DUE_SHARE = 0.8  # replies are due from this share of the phase's previous wait on
FAST_WINDOW_S = 2.0  # polling fast for at most this long per phase
WIRE_FORMAT_ERROR_CODE = 1010  # a device's reply whose flat layout does not fit


class PromptGrid:
    """A :class:`Grid` whose ``send_and_receive`` polls promptly; every other attribute
    is the wrapped grid's."""

    def __init__(self, grid: Grid, *, flat_wire: bool = True) -> None:
        self._grid = grid
        self._flat_wire = flat_wire  # pack what it pushes (run config flat-wire)
        self._last_wait_s: dict[str, float] = {}  # per message type: push to last reply
        prompt_pulls.apply(http_grid)  # a reply's objects, pulled as soon as they are stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages``, each with its content packed in place (the message object
        is what was sent, so it holds what crossed the wire)."""
        messages = list(messages)
        for msg in messages if self._flat_wire else ():
            if msg.has_content():
                msg.content = flat_wire.pack(msg.content)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies that arrived, unpacked."""
        return [_unpacked(reply) for reply in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages``, then pull replies until each has one or ``timeout`` (s)
        passes (None: wait for all), as Flower's own method does."""
        tracing = hop_trace.enabled()  # the deployment benchmark's per-hop timestamps
        messages = list(messages)
        started = time.monotonic()
        if tracing:
            hop_trace.mark("server-push", group=messages[0].metadata.group_id
                           if messages else "")
        pending = set(self.push_messages(messages))
        if tracing:
            hop_trace.mark("server-pushed")
        deadline = None if timeout is None else time.monotonic() + timeout
        phase = _phase(messages)
        previous = self._last_wait_s.get(phase)
        schedule = PollSchedule(None if previous is None else DUE_SHARE * previous)
        replies: list[Message] = []
        while pending:
            arrived = self.pull_messages(pending)
            for reply in arrived if tracing else ():
                hop_trace.mark("server-reply", src=reply.metadata.src_node_id,
                               group=reply.metadata.group_id)
            replies += arrived
            pending -= {msg.metadata.reply_to_message_id for msg in arrived}
            elapsed = time.monotonic() - started
            if not pending:
                self._last_wait_s[phase] = elapsed
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            wait = schedule.next_wait(elapsed, replied=bool(replies))
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            time.sleep(max(wait, 0.0))
        return replies


class PollSchedule:
    """How long one phase's poll sleeps: fast while its replies are due, else a slow
    interval growing from :data:`FIRST_POLL_S` to :data:`MAX_POLL_S`. ``due_s``: seconds
    after the push from which replies are expected (None: not known, the first time)."""

    def __init__(self, due_s: float | None) -> None:
        self._fast_from = math.inf if due_s is None else due_s
        self._slow = FIRST_POLL_S

    def next_wait(self, elapsed: float, *, replied: bool) -> float:
        """The sleep before the next pull, ``elapsed`` s after the push; ``replied``:
        whether any reply of the phase has arrived."""
        if replied:
            self._fast_from = min(self._fast_from, elapsed)
        if self._fast_from <= elapsed <= self._fast_from + FAST_WINDOW_S:
            return FAST_POLL_S
        wait, self._slow = self._slow, min(self._slow * 1.5, MAX_POLL_S)
        return wait


def _phase(messages: list[Message]) -> str:
    """The message type a phase sends (its rounds take about as long as each other)."""
    return messages[0].metadata.message_type if messages else ""


def _unpacked(reply: Message) -> Message:
    """``reply`` with its flat records restored, or an error reply saying why not."""
    if reply.has_error() or not reply.has_content() or not flat_wire.is_packed(reply.content):
        return reply
    try:
        reply.content = flat_wire.unpack(reply.content)
    except flat_wire.WireFormatError as err:
        reason = f"device {reply.metadata.src_node_id}: {err}"
        log(logging.WARNING, "[fedq] reply refused: %s", reason)
        return make_message(metadata=reply.metadata,
                            error=Error(code=WIRE_FORMAT_ERROR_CODE, reason=reason))
    return reply
