"""Nothing saved is lost on any single fault: the fault drill on the real loopback
topology, as harness benchmarks (the drill itself: :mod:`simulations.fault_drill`).

Each benchmark is one drill (one cell: a seed and its sessions). ``fault_drill`` draws from
every fault kind, with real full disks when run as root; ``fault_drill_new_kinds`` from
the kinds added later (the DP device's privacy ledger, the int8 residual, the server's
``privacy.jsonl`` and ``status.json``, a checkpoint killed mid-save), with a second
session that resumes the run and adds the two kinds its first session drew least of.
The table counts, per kind, the faults injected, survived (nothing lost), lost, named
(the failure names the file or device), with no visible effect, and unnamed.

    python -m fedq.simulations.bench fault_drill
    python -m fedq.simulations.bench fault_drill_new_kinds --set seed=5 --results-root runs/drills

Process-level: the drill kills and stops real Flower processes and times rounds, so its
cells never run beside another cell (``parallel=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedq.simulations.fault_drill import FAULT_DRILL, drill_sessions
from fedq.simulations.harness import (
    Benchmark,
    Cell,
    Done,
    HarnessError,
    Summary,
    register_benchmark,
)


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """The one drill; its sessions are checked here, before any process starts."""
    drill_sessions(params)
    for key in ("settle", "round-timeout", "orphan-age"):
        if not params[key] > 0:
            raise HarnessError(f"{key}: must be > 0, got {params[key]!r}")
    return [Cell(FAULT_DRILL, dict(params))]


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    ((_, drill),) = done
    rows = [row for row in drill["table"] if row["injected"] or row["kind"] == "total"]
    columns = list(drill["table"][0])
    lost = [f for f in drill["faults"] if f["lost"]]
    unnamed = [f for f in drill["faults"] if f["named"] == "unnamed"]
    sessions = "\n".join(
        f"- session {i}: {s['faults']} faults of {', '.join(s['kinds'])} in {s['seconds']} s, "
        f"round {s['rounds-at-end']} at its end, {len(s['submissions'])} submissions; full "
        f"disk: {s['full-disk']}; {s['private']}; orphans: {len(s['orphans'])}"
        for i, s in enumerate(drill["sessions"]))
    listed = "".join(f"\n- LOST {f['kind']} on {f['target']} ({f['detail']}): "
                     f"{'; '.join(f['lost'])}" for f in lost) + "".join(
        f"\n- UNNAMED {f['kind']} on {f['target']} ({f['detail']})" for f in unnamed)
    text = (f"Seed {params['seed']}; the run reached round {drill['rounds']}; orphaned "
            f"ClientApps: {drill['orphans']}.\n\n{sessions}{listed}\n\n"
            "Survived = nothing lost: metrics.jsonl holds every round once, no device's or "
            "checkpoint's saved progress went back, the DP device's epsilon never fell, "
            "and a round completed after the fault. Named = the failure shows the damaged "
            "file, the device's node id or the error (see simulations/fault_drill.py); no "
            "effect = nobody noticed it (a stop that ended before anyone waited, a file "
            "superseded before it was read). Every fault with its details is in "
            "results.json.")
    return Summary(rows, columns, text, payload={
        k: drill[k] for k in ("sessions", "rounds", "orphans", "faults")})


_DEFAULTS = {"seed": 17, "sessions": [{"faults": 120, "minutes": 13, "kinds": "all"}],
             "settle": 90.0, "round-timeout": 40, "orphan-age": 300.0, "real-disk": True}
_QUICK = {"seed": 0, "real-disk": False, "sessions": [
    {"faults": 3, "minutes": 1, "kinds": "clientapp-kill9,device-file,serverapp-kill9"}]}

register_benchmark(Benchmark(
    "fault_drill", "random kills, stops, full disks and damaged files on the loopback "
    "topology: survived, lost, named per fault kind", defaults=_DEFAULTS, quick=_QUICK,
    cells=cells, summarise=summarise, parallel=False))
register_benchmark(Benchmark(
    "fault_drill_new_kinds", "the drill's later fault kinds (privacy ledger, int8 residual, "
    "privacy.jsonl, status.json, checkpoint mid-save), a DP device, two sessions",
    defaults={**_DEFAULTS, "seed": 31, "real-disk": False, "sessions": [
        {"faults": 30, "minutes": 24,
         "kinds": "ledger-file,residual-file,privacy-log,status-file,checkpoint-mid-save"},
        {"faults": 40, "minutes": 6, "kinds": "status-file,residual-file"}]},
    quick=_QUICK, cells=cells, summarise=summarise, parallel=False))
