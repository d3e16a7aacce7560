"""The ServerApp's grid collects replies as they arrive instead of Flower's 3-second
polling, and still honours the phase timeout; a real SuperLink round uses it in the
deployment tests."""

import time
from types import SimpleNamespace

from fedq.server.prompt_grid import MAX_POLL_S, PromptGrid


def _messages(n):
    """``n`` messages without content (nothing for the grid to pack)."""
    return [SimpleNamespace(has_content=lambda: False) for _ in range(n)]


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
