"""The ServerApp's grid collects replies as they arrive instead of Flower's 3-second
polling, and still honours the phase timeout; a real SuperLink round uses it in the
deployment tests."""

import time
from types import SimpleNamespace

from fedq.server.prompt_grid import (
    FAST_POLL_S,
    FAST_WINDOW_S,
    MAX_POLL_S,
    PollSchedule,
    PromptGrid,
)


def _messages(n, message_type="train"):
    """``n`` messages without content (nothing for the grid to pack)."""
    return [SimpleNamespace(has_content=lambda: False,
                            metadata=SimpleNamespace(message_type=message_type))
            for _ in range(n)]


class _SlowNodes:
    """A grid whose replies arrive ``delays`` seconds after the push, one per message."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"),
                                has_error=lambda: True)  # nothing for the grid to unpack
                for i, delay in enumerate(self.delays) if f"m{i}" in ids and now >= delay]

    def get_node_ids(self):
        return [1, 2]


def test_replies_are_collected_within_a_poll_of_arriving():
    nodes = _SlowNodes([0.2, 0.4])
    started = time.monotonic()
    replies = PromptGrid(nodes).send_and_receive(_messages(2), timeout=10)
    waited = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert waited < 0.4 + MAX_POLL_S + 0.2  # Flower's own loop would take 3 s here
    assert PromptGrid(nodes).get_node_ids() == [1, 2]  # the rest is the wrapped grid's


def test_the_phase_timeout_still_ends_the_wait_with_the_replies_so_far():
    nodes = _SlowNodes([0.0, 60.0])
    started = time.monotonic()
    replies = PromptGrid(nodes).send_and_receive(_messages(2), timeout=0.5)
    assert time.monotonic() - started < 0.5 + 0.2
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]


def test_polls_fast_only_while_replies_are_due():
    """Replies due from 1 s on (the phase's previous round): slow before, every 20 ms
    in the due window, slow again for a straggler after the window."""
    schedule = PollSchedule(due_s=1.0)
    assert schedule.next_wait(0.3, replied=False) > FAST_POLL_S
    assert schedule.next_wait(1.05, replied=False) == FAST_POLL_S
    assert schedule.next_wait(1.0 + FAST_WINDOW_S + 0.1, replied=False) > FAST_POLL_S


def test_the_first_reply_of_a_phase_makes_the_rest_due():
    """Without a previous round (the first), a device's reply is the signal that the
    others are close."""
    schedule = PollSchedule(due_s=None)
    assert schedule.next_wait(0.5, replied=False) > FAST_POLL_S
    assert schedule.next_wait(0.6, replied=True) == FAST_POLL_S


def test_a_round_of_a_known_length_is_seen_within_a_fast_poll_of_its_last_reply():
    """The second round of a phase: its last reply is collected within a fast poll (plus
    scheduling slack), and the pulls stay few before it is due. (The slow polls alone,
    at 0.05, 0.125, 0.225, ... 0.625 s, would see a reply at 0.535 s 90 ms late.)"""
    nodes = _SlowNodes([0.535])  # each push restarts the reply's clock
    grid = PromptGrid(nodes)
    grid.send_and_receive(_messages(1), timeout=10)  # learns the phase's length
    pulls_before, started = nodes.pulls, time.monotonic()
    grid.send_and_receive(_messages(1), timeout=10)
    assert time.monotonic() - started < 0.535 + FAST_POLL_S + 0.04
    assert nodes.pulls - pulls_before < 0.535 / MAX_POLL_S + 0.1 / FAST_POLL_S + 3
