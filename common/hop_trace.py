"""Per-hop timestamps of a deployed round, for the deployment benchmark.

A deployed round's message crosses several processes (ServerApp, SuperLink, SuperNode,
its task loop, the fork server, the forked ClientApp child and back), and the time a
round spends outside training hides in the hand-offs between them. With
``FEDQ_HOP_TRACE_DIR`` set (``simulations.bench_deployment`` sets it for the whole
topology; every process inherits it), each of them appends one JSON line per event to
``<dir>/<pid>.jsonl``: the wall-clock time (``time.time()``: the processes share a
machine, so their clocks agree), the event's name and a few fields (group id, node id).
A device's processes also carry the pid of their ``fedq-supernode``
(``FEDQ_HOP_TRACE_NODE``, set by it and inherited by every fork), so the benchmark can
tell which device an event belongs to. Unset (every real deployment), :func:`mark`
returns after one dictionary look-up and writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

TRACE_DIR_ENV = "FEDQ_HOP_TRACE_DIR"
NODE_ENV = "FEDQ_HOP_TRACE_NODE"  # the fedq-supernode pid of a device's processes


def enabled() -> bool:
    """Whether this process traces (``FEDQ_HOP_TRACE_DIR`` is set)."""
    return bool(os.environ.get(TRACE_DIR_ENV))


def mark(event: str, **fields: object) -> None:
    """Append ``event`` with the time now (and ``fields``) to this process's trace file,
    when tracing is on. Never raises: a trace must not break the round it measures."""
    directory = os.environ.get(TRACE_DIR_ENV)
    if not directory:
        return
    line = {"t": time.time(), "event": event, "pid": os.getpid(),
            "node": os.environ.get(NODE_ENV), **fields}
    try:
        with open(Path(directory) / f"{os.getpid()}.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
    except OSError:
        pass


def read(directory: Path) -> list[dict]:
    """Every event written under ``directory``, in time order."""
    events = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for raw in path.read_text().splitlines():
            if raw.strip():
                events.append(json.loads(raw))
    return sorted(events, key=lambda e: e["t"])
