"""End ClientApp work that nobody can use any more, keeping what it did.

A ``flwr-clientapp`` process serves one message. When the SuperLink is killed mid-round,
or its SuperNode (or the SuperNode's SuperExec) dies, nothing will take its reply, yet
Flower lets it run on: the fault drill of issue 16 saw such processes train and retry
for 49 minutes. :class:`RoundWatch` is a daemon thread started for every message (by
:func:`round_watch_mod`) that asks the work to stop when

- the round's ``round-timeout`` has passed since the handler started (the server has
  moved on; a later reply is refused), or
- a Flower ancestor of this process (its SuperExec, its SuperNode) is gone.

Stopping is cooperative first: the train handler polls :meth:`RoundWatch.should_stop`
between env steps (``LocalTrainer.train``'s ``should_stop``), keeps the steps done so far,
saves the device state as always (a complete generation or none, under
:meth:`RoundWatch.saving`), and replies with an error (code ``ROUND_STOPPED_ERROR_CODE``)
that says how much it trained and why it stopped. In a ``flwr-clientapp`` process the
watch then ends the process itself: at once when its parent is gone (no reply can be
delivered), or when the process is still alive ``linger`` seconds after its handler
returned, or when the handler did not come to a stop ``grace`` seconds after it was asked
(stuck). It never ends the process in the middle of a save: it takes the save lock
first. In other processes (Flower's simulation engine, tests) it only asks the handler.

An operator sees ``[fedq] round watch: ...`` lines in the SuperNode's log, naming the
device, the pid and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

ROUND_STOPPED_ERROR_CODE = 1004
"""Error code of a train reply whose work the round watch stopped (the work is saved)."""
EXIT_CODE = 75  # EX_TEMPFAIL: the process was ended on purpose, its state is consistent
# fedq-supernode is Flower's SuperNode; its warm executor's fork server (the parent of
# each ClientApp child, client/warm_executor.py) runs under the same command line
_FLOWER_PARENTS = ("flower-supernode", "flower-superexec", "fedq-supernode")
_current: contextvars.ContextVar[RoundWatch | None] = contextvars.ContextVar(
    "fedq_round_watch", default=None)


class RoundWatch:
    """The watch of one message's handler (see the module docstring)."""

    def __init__(self, timeout_s: float | None, *, name: str = "device",
                 ancestors: list[tuple[int, int]] | None = None, poll_s: float = 1.0,
                 grace_s: float = 30.0, linger_s: float = 60.0,
                 end_process: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.ancestors = list(ancestors or [])
        self.poll_s, self.grace_s, self.linger_s = poll_s, grace_s, linger_s
        # ending the process is for flwr-clientapp processes only (those with ancestors)
        self.end_process = end_process if end_process is not None else (
            os._exit if self.ancestors else None)
        self.reason: str | None = None
        self._stop = threading.Event()
        self._stopped_at: float | None = None
        self._handler_done: float | None = None
        self._closed = threading.Event()
        self._save_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fedq-round-watch",
                                        daemon=True)

    # --- the handler's side ------------------------------------------------------------
    def start(self) -> RoundWatch:
        self._thread.start()
        return self

    def should_stop(self) -> bool:
        """Whether the work should end now (cheap: called between env steps)."""
        return self._stop.is_set()

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Hold while saving the device state: the watch never ends the process inside."""
        with self._save_lock:
            yield

    def handler_done(self) -> None:
        """The handler returned; without a process to end, the watch ends too."""
        self._handler_done = time.monotonic()
        if self.end_process is None:
            self._closed.set()

    def close(self) -> None:
        self._closed.set()

    # --- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.wait(self.poll_s):
            now = time.monotonic()
            gone = self._gone_ancestor()
            if not self._stop.is_set():
                if gone is not None:
                    self._ask(f"its parent process {gone} is gone, so no reply can be "
                              "delivered")
                elif self.deadline is not None and now >= self.deadline:
                    self._ask(f"round-timeout ({self.timeout_s:g}s) has passed since the "
                              "round began here, so the server no longer takes its reply")
            if self.end_process is None:
                continue
            if gone is not None and self._handler_done is not None:
                self._end(f"its parent process {gone} is gone")
            elif self._handler_done is not None and now - self._handler_done > self.linger_s:
                self._end(f"its reply was not delivered {self.linger_s:g}s after its "
                          "handler returned")
            elif (self._handler_done is None and self._stopped_at is not None
                  and now - self._stopped_at > self.grace_s):
                self._end(f"its handler did not stop {self.grace_s:g}s after it was asked "
                          f"({self.reason})")

    def _ask(self, reason: str) -> None:
        self.reason = reason
        self._stopped_at = time.monotonic()
        self._stop.set()
        log(logging.WARNING, "[fedq] round watch: %s (pid %d): stopping its work: %s",
            self.name, os.getpid(), reason)

    def _end(self, reason: str) -> None:
        with self._save_lock:  # never inside a save: wait for it to finish
            log(logging.WARNING, "[fedq] round watch: ending ClientApp pid %d of %s: %s; its "
                "device state holds every save that finished", os.getpid(), self.name,
                reason)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            assert self.end_process is not None
            self.end_process(EXIT_CODE)
            self._closed.set()  # only reached when end_process is a test's stand-in

    def _gone_ancestor(self) -> str | None:
        for pid, start in self.ancestors:
            if _start_time(pid) != start:
                return f"{pid} (its Flower SuperExec or SuperNode)"
        return None


def flower_ancestors(pid: int | None = None) -> list[tuple[int, int]]:
    """(pid, start time) of this process's Flower ancestors: the run of
    ``flower-superexec`` / ``flower-supernode`` processes directly above it (empty when
    the parent is not one, e.g. in Flower's simulation engine or a test)."""
    found = []
    pid = os.getppid() if pid is None else pid
    while pid > 1 and _program(pid) in _FLOWER_PARENTS:
        start = _start_time(pid)
        if start is None:
            break
        found.append((pid, start))
        pid = _parent(pid)
    return found


def current_watch() -> RoundWatch | None:
    """The watch of the message this thread is handling, if a mod started one."""
    return _current.get()


def round_watch_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Start a :class:`RoundWatch` for the message (deadline: the run config's
    ``round-timeout``), so the handler can poll it and the process cannot outlive its use."""
    timeout = context.run_config.get("round-timeout")
    partition = context.node_config.get("partition-id")
    name = f"partition-{partition}" if partition is not None else f"node-{context.node_id}"
    watch = RoundWatch(float(timeout) if isinstance(timeout, int | float) else None,
                       name=name, ancestors=flower_ancestors()).start()
    token = _current.set(watch)
    try:
        return call_next(msg, context)
    finally:
        watch.handler_done()
        _current.reset(token)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the state on


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None  # gone, or a zombie: dead, only not reaped yet
    return int(fields[19])


def _parent(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def _program(pid: int) -> str:
    """The name of the console script ``pid`` runs (``python /x/bin/flower-supernode``
    or ``/x/bin/flower-supernode``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    for arg in argv[:2]:
        name = Path(arg.decode(errors="replace")).name
        if name in _FLOWER_PARENTS:
            return name
    return ""
