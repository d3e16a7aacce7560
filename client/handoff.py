"""Event-driven hand-offs inside a device: its processes wake each other, not a timer.

A message's way through a device (Flower 1.42, ``fedq-supernode`` with the warm
executor) has two hand-offs between the device's own processes that Flower does by
polling:

* the SuperNode stores the message it pulled from the SuperLink; the **task loop**
  (Flower's ``run_superexec``) finds it with its next AcquireTask, after sleeping
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (``time.sleep`` in ``run_superexec``);
* the ClientApp child pushes its reply to the SuperNode's runtime API; the SuperNode's
  ``_push_messages`` finds it after sleeping up to its poll interval (``time.sleep`` in
  ``start_client_internal``; the same sleep waits for the reply's objects).

Each cost half a poll interval on average, a whole one at worst, on every round's
critical path. Flower offers no notification between these processes, but with the
warm executor all of them descend from the SuperNode by ``fork``, so they share pipes
created before the fork: a :class:`Doorbell` is such a pipe. The SuperNode rings the
**task bell** when it has stored a message (:func:`ring_after_store`), and the task loop's
sleep (:func:`sleep_until_rung`) returns at once; a ClientApp child rings the **reply
bell** when its reply and all the reply's objects are pushed, and the SuperNode's sleep
returns. Each sleep still ends after its interval without a ring, so a lost ring costs
one poll, as before; a ring nobody waits for only shortens the next sleep, after which
the loop checks its state as it always does.

The SuperNode's pull of the SuperLink, and the ServerApp's pull of the replies, cross
machines and stay polls (:mod:`client.supernode`, :mod:`server.prompt_grid`); the
SuperNode's polls fast for a short window after each reply it sent (:class:`Burst`),
when the round's next message is due.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedq.common import hop_trace


class Doorbell:
    """A pipe that a forked relative rings and one process waits on; level-triggered, so
    a ring that comes before the wait is not lost."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # not inherited across exec, only fork
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def ring(self) -> None:
        """Wake whoever waits (or the next wait). Never blocks or raises: a full pipe
        is already rung, a closed one has nobody to wake."""
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"!")

    def wait(self, timeout: float) -> bool:
        """Return when rung (True; the rings so far are consumed) or after ``timeout``
        seconds (False)."""
        ready, _, _ = select.select([self.read_fd], [], [], max(timeout, 0.0))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self.read_fd, 4096):
                pass
        return True


@dataclass(frozen=True)
class Bells:
    """A device's two doorbells, made by the SuperNode before it forks its fork server."""

    task: Doorbell  # SuperNode -> task loop: a message is stored, acquire its task
    reply: Doorbell  # ClientApp child -> SuperNode: a reply is pushed, send it

    @classmethod
    def make(cls) -> Bells:
        return cls(task=Doorbell(), reply=Doorbell())


class Burst:
    """Poll the SuperLink every ``fast_s`` seconds for ``window_s`` seconds after the
    device sent a reply, at the normal interval otherwise.

    The SuperNode's pull of the SuperLink is the one hop a device cannot be rung for
    (Flower 1.42 has no push to devices). Its next message comes right after the
    round's last reply: the ServerApp's poll, aggregation and push, a few tenths of a
    second. The device whose reply was last, the one the round waited for, then finds
    it within ``fast_s`` instead of half a normal interval on average; a device that
    replied earlier polls fast only for the window, not while the others still train."""

    def __init__(self, fast_s: float, window_s: float) -> None:
        self.fast_s = fast_s
        self.window_s = window_s
        self.started = -math.inf

    def start(self) -> None:
        """The device has just sent a reply."""
        self.started = time.monotonic()

    def cap(self, normal: float) -> float:
        """The longest poll sleep now: ``fast_s`` inside the window, else ``normal``."""
        fast = time.monotonic() - self.started < self.window_s
        return min(normal, self.fast_s) if fast else normal


class BellSleepTime(types.ModuleType):
    """The ``time`` module with ``sleep`` capped at ``cap`` seconds (``burst``'s shorter
    cap inside its window) and ended early by ``bell``; every other function is the real
    one."""

    def __init__(self, cap: float, bell: Doorbell | None = None,
                 burst: Burst | None = None) -> None:
        super().__init__("time")
        self.cap = cap
        self.bell = bell
        self.burst = burst

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, at most ``cap``, less if the bell rings."""
        seconds = min(seconds, self.burst.cap(self.cap) if self.burst else self.cap)
        if self.bell is None:
            time.sleep(seconds)
        else:
            self.bell.wait(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def sleep_until_rung(module: types.ModuleType, bell: Doorbell | None, cap: float,
                     burst: Burst | None = None) -> None:
    """Make ``module``'s ``time.sleep`` (a Flower module that polls) last at most ``cap``
    seconds (``burst``'s cap inside its window) and end when ``bell`` (if any) rings;
    refuses a module that no longer sleeps with the ``time`` module."""
    if not isinstance(getattr(module, "time", None), types.ModuleType):
        raise RuntimeError(f"{module.__name__} no longer sleeps with the time module; "
                           "fedq's hand-offs need updating for this Flower")
    module.time = BellSleepTime(cap, bell, burst)  # type: ignore[attr-defined]


def ring_after_store(start_client_internal: types.ModuleType, bell: Doorbell | None,
                     burst: Burst | None = None) -> None:
    """Ring ``bell`` (the task bell) each time the SuperNode has stored a message pulled
    from the SuperLink (Flower's ``_pull_and_store_message`` returned its run id), start
    ``burst`` each time it has sent a reply, and trace the SuperNode's hops
    (:mod:`common.hop_trace`); idempotent."""
    store = start_client_internal._pull_and_store_message
    push = start_client_internal._push_messages
    if not getattr(store, "fedq_handoff", False):
        start_client_internal._pull_and_store_message = _after_store(store, bell)
    if not getattr(push, "fedq_handoff", False):
        start_client_internal._push_messages = _after_push(push, burst)


def _after_store(store: Callable[..., int | None], bell: Doorbell | None
                 ) -> Callable[..., int | None]:
    @functools.wraps(store)
    def pull_and_store(*args: Any, **kwargs: Any) -> int | None:
        if hop_trace.enabled() and "receive" in kwargs:
            kwargs["receive"] = _traced_receive(kwargs["receive"])
        run_id = store(*args, **kwargs)
        if run_id is not None:
            hop_trace.mark("supernode-stored")
            if bell is not None:
                bell.ring()
        return run_id

    pull_and_store.fedq_handoff = True  # type: ignore[attr-defined]
    return pull_and_store


def _traced_receive(receive: Callable[[], Any]) -> Callable[[], Any]:
    def traced() -> Any:
        got = receive()
        if got is not None:
            hop_trace.mark("supernode-received", group=got[0].metadata.group_id)
        return got
    return traced


def _after_push(push: Callable[..., None], burst: Burst | None) -> Callable[..., None]:
    @functools.wraps(push)
    def push_messages(*args: Any, **kwargs: Any) -> None:
        if hop_trace.enabled() and "send" in kwargs:
            send = kwargs["send"]

            def traced_send(*a: Any, **k: Any) -> Any:
                hop_trace.mark("supernode-reply-seen")
                return send(*a, **k)

            kwargs["send"] = traced_send
        push(*args, **kwargs)
        hop_trace.mark("supernode-reply-sent")
        if burst is not None:
            burst.start()

    push_messages.fedq_handoff = True  # type: ignore[attr-defined]
    return push_messages


def ring_after(function: Callable[..., Any], bell: Doorbell | None, event: str
               ) -> Callable[..., Any]:
    """``function`` (e.g. Flower's ``push_message`` in a ClientApp child), then ``bell``
    (if any) rung and ``event`` traced once it returned."""
    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hop_trace.mark(f"{event}-start")
        result = function(*args, **kwargs)
        hop_trace.mark(event)
        if bell is not None:
            bell.ring()
        return result
    return wrapped

