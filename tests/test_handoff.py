"""Event-driven hand-offs inside a device (client/handoff.py).

Protects that a doorbell rung by a forked process ends a wait at once (no poll interval),
that a ring before the wait is not lost, that an unrung wait still ends after its
interval (a lost ring costs one poll, as before), and that the sleeps patched into
Flower's polling modules are capped and rung as configured.
"""

import os
import time
import types

import pytest

from fedq.client.handoff import BellSleepTime, Burst, Doorbell, ring_after, sleep_until_rung


def test_a_ring_from_a_forked_child_ends_the_wait_at_once():
    bell = Doorbell()
    pid = os.fork()
    if pid == 0:  # the child: ring after 0.1 s, as a ClientApp child after its push
        time.sleep(0.1)
        bell.ring()
        os._exit(0)
    started = time.monotonic()
    rung = bell.wait(5.0)
    waited = time.monotonic() - started
    os.waitpid(pid, 0)
    assert rung and waited < 2.0, f"waited {waited:.2f} s for a ring sent after 0.1 s"


def test_a_ring_before_the_wait_is_kept_and_consumed_once():
    bell = Doorbell()
    bell.ring()
    bell.ring()
    assert bell.wait(5.0)  # at once
    started = time.monotonic()
    assert not bell.wait(0.05)  # both rings were consumed by the first wait
    assert time.monotonic() - started >= 0.04


def test_a_full_pipe_does_not_block_the_ringer():
    bell = Doorbell()
    for _ in range(100_000):  # far more than a pipe holds
        bell.ring()
    assert bell.wait(0)


def test_bell_sleep_is_capped_and_ends_on_a_ring():
    bell = Doorbell()
    capped = BellSleepTime(0.05, bell)
    started = time.monotonic()
    capped.sleep(3)
    assert 0.04 <= time.monotonic() - started < 1.0
    bell.ring()
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 0.04
    assert capped.monotonic is time.monotonic  # every other function is the real one


def test_only_modules_that_sleep_with_time_are_patched():
    module = types.ModuleType("flwr_like")
    module.time = time
    sleep_until_rung(module, Doorbell(), 0.1)
    assert isinstance(module.time, BellSleepTime) and module.time.cap == 0.1
    with pytest.raises(RuntimeError, match="no longer sleeps with the time module"):
        sleep_until_rung(types.ModuleType("changed"), Doorbell(), 0.1)


def test_ring_after_rings_once_the_call_returned():
    bell = Doorbell()
    calls = []

    def push(value):
        calls.append(bell.wait(0))  # not rung yet while it pushes
        return value * 2

    assert ring_after(push, bell, "pushed")(21) == 42
    assert calls == [False] and bell.wait(0)


def test_a_burst_shortens_the_poll_only_inside_its_window():
    burst = Burst(fast_s=0.02, window_s=0.2)
    assert burst.cap(0.2) == 0.2  # no reply sent yet
    burst.start()
    assert burst.cap(0.2) == 0.02
    assert burst.cap(0.01) == 0.01  # never longer than the normal interval
    time.sleep(0.25)
    assert burst.cap(0.2) == 0.2


def test_the_supernode_sleeps_at_the_burst_interval_after_a_reply():
    burst = Burst(fast_s=0.01, window_s=5.0)
    capped = BellSleepTime(0.5, Doorbell(), burst)
    burst.start()
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 0.3
