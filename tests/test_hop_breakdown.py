"""The deployment benchmark's per-hop breakdown (simulations/hop_breakdown.py) and the
trace it reads (common/hop_trace.py).

Protects that the hops of the device whose reply came last add up to the round's cycle
(push to next push), that another device's events never enter that chain, and that
tracing writes nothing unless FEDQ_HOP_TRACE_DIR is set.
"""

import pytest

from fedq.common import hop_trace
from fedq.simulations.hop_breakdown import HOPS, cycles, median_hops

DEVICE_EVENTS = ["supernode-received", "supernode-stored", "taskloop-launch", "child-start",
                 "child-pulled", "handler-start", "handler-evaluated", "handler-state-loaded",
                 "handler-trained", "handler-end", "child-pushed", "supernode-reply-seen",
                 "supernode-reply-sent"]


def _round(start, slow_node, fast_node, train):
    """One round's events: node ``slow_node`` trains ``train`` s, ``fast_node`` 0.1 s."""
    events = [{"t": start, "event": "server-push", "node": None},
              {"t": start + 0.05, "event": "server-pushed", "node": None}]
    for node, pid, seconds in ((slow_node, "11", train), (fast_node, "22", 0.1)):
        t = start + 0.05
        for name in DEVICE_EVENTS:
            t += seconds if name == "handler-trained" else 0.01
            event = {"t": t, "event": name, "node": pid}
            if name == "child-pulled":
                event["dst"] = node
            events.append(event)
        events.append({"t": t + 0.02, "event": "server-reply", "src": node, "node": None})
    return events


def test_the_critical_devices_hops_add_up_to_the_round():
    events = sorted(_round(0.0, 7, 8, 1.0) + _round(2.0, 7, 8, 1.5)
                    + [{"t": 4.0, "event": "server-push", "node": None}],
                    key=lambda e: e["t"])
    per_cycle = cycles(events)
    assert [c["critical"] for c in per_cycle] == [7, 7]
    for cycle in per_cycle:
        hops = sum(cycle[name] for name, _, _ in HOPS)
        assert hops == pytest.approx(cycle["cycle"])
    assert per_cycle[1]["local training"] == pytest.approx(1.5)
    assert median_hops(per_cycle)["cycle"] == pytest.approx(2.0)


def test_tracing_writes_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(hop_trace.TRACE_DIR_ENV, raising=False)
    hop_trace.mark("nothing")
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(hop_trace.TRACE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(hop_trace.NODE_ENV, "123")
    hop_trace.mark("child-pulled", dst=7)
    [event] = hop_trace.read(tmp_path)
    assert event["event"] == "child-pulled" and event["node"] == "123" and event["dst"] == 7
