"""Where a deployed round's seconds go, hop by hop, from :mod:`common.hop_trace` events.

A round's cycle runs from the ServerApp pushing one round's messages to it pushing the
next round's: the round waits for its last reply, so the device whose reply reached the
ServerApp last is on the critical path, and its chain of events splits the cycle into
hops that add up to it exactly (a hop whose events are missing is left out, so the
sum then falls short). :data:`HOPS` names them in order, each with the two events that
bound it.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict

# (hop, from event, to event); "server-*" events are the ServerApp's, the rest the
# critical device's
HOPS: tuple[tuple[str, str, str], ...] = (
    ("ServerApp push (all devices)", "server-push", "server-pushed"),
    ("SuperLink -> SuperNode pull (poll)", "server-pushed", "supernode-received"),
    ("SuperNode pulls the weights", "supernode-received", "supernode-stored"),
    ("task loop acquires the task", "supernode-stored", "taskloop-launch"),
    ("fork server forks the child", "taskloop-launch", "child-start"),
    ("child pulls its message", "child-start", "child-pulled"),
    ("FAB install, app load", "child-pulled", "handler-start"),
    ("fused evaluation", "handler-start", "handler-evaluated"),
    ("state load", "handler-evaluated", "handler-state-loaded"),
    ("local training", "handler-state-loaded", "handler-trained"),
    ("state save, reply", "handler-trained", "handler-end"),
    ("mods, reply push", "handler-end", "child-pushed"),
    ("SuperNode sees the reply", "child-pushed", "supernode-reply-seen"),
    ("SuperNode sends it", "supernode-reply-seen", "supernode-reply-sent"),
    ("ServerApp gets it (poll)", "supernode-reply-sent", "server-reply"),
    ("ServerApp between rounds", "server-reply", "server-push"),
)
TRAINING_HOP = "local training"


def cycles(events: list[dict]) -> list[dict[str, float]]:
    """Per ServerApp push (a message to every device), the hop durations (s) of its
    critical device, the ``cycle`` length (to the next push) and that device's node id
    (``critical``); the last push, which has no next one, is left out."""
    pushes = [e for e in events if e["event"] == "server-push"]
    node_of_pid = {e["node"]: e["dst"] for e in events if e["event"] == "child-pulled"}
    out = []
    for start, end in itertools.pairwise(pushes):
        window = [e for e in events if start["t"] <= e["t"] < end["t"]]
        replies = [e for e in window if e["event"] == "server-reply"]
        if not replies:
            continue
        critical = replies[-1]["src"]
        chain: dict[str, float] = {}
        for e in window:
            mine = e["event"].startswith("server-") or node_of_pid.get(e["node"]) == critical
            if mine and e["event"] != "server-reply":
                chain.setdefault(e["event"], e["t"])  # first occurrence in the cycle
        chain["server-reply"] = replies[-1]["t"]
        chain["server-push"] = start["t"]
        hops = {"cycle": end["t"] - start["t"], "critical": critical}
        for name, first, then in HOPS:
            stop = end["t"] if then == "server-push" else chain.get(then)
            begin = chain.get(first)
            if begin is not None and stop is not None:
                hops[name] = stop - begin
        out.append(hops)
    return out


def median_hops(per_cycle: list[dict[str, float]]) -> dict[str, float]:
    """Each hop's median over ``per_cycle`` (those cycles that have it), and the cycle's."""
    values: dict[str, list[float]] = defaultdict(list)
    for hops in per_cycle:
        for name, seconds in hops.items():
            if name != "critical":
                values[name].append(seconds)
    return {name: statistics.median(v) for name, v in values.items()}
