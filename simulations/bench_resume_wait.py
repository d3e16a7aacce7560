"""How long does a resumed run wait after a crash, and does stopping the crashed run help?

After the ServerApp dies (or the SuperLink is killed and restarted with its database),
the run it served stays "running" on the SuperLink until the dead ServerApp's heartbeat
expires (Flower 1.42: 30 s x patience 2, not configurable). If the ServerApp died while
pushing a round's messages, each SuperNode is meanwhile retrying the objects of a message
that will never get them, and a SuperNode receives one message at a time: the resumed
run's first round waits for that expiry. ``flwr stop`` of the crashed run ends the wait
(docs/durability.md). This measures both, on the compose topology as local processes
(:func:`simulations.compose_topology.compose_topology`, numpy devices, the SuperLink with
its ``--database`` as the compose file gives it):

- crash ``serverapp-kill``: SIGKILL the ServerApp right after round 1's checkpoint;
- crash ``superlink-restart``: SIGKILL the SuperLink (and what it started) at the same
  point and start it again with its database;

then resubmit the same run directory with ``resume = true`` (``fedq-submit``, the submit
service's command), either at once (``resubmit``) or after ``flwr stop`` of the crashed
run (``stop-then-resubmit``). Per cell: the resumed run's first round time, the other
rounds', the resubmission's wall time, every round present once, and the crashed run's
``fedq-submit`` exit status. Cells run one at a time, repeat by repeat, the four
combinations alternating within a repeat, so load drift hits them alike.

    python -m fedq.simulations.bench resume_wait
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.simulations.compose_topology import TINY_RUN, compose_topology
from fedq.simulations.flower_runtime import (
    SuperLinkHandle,
    kill_serverapp,
    restart_superlink,
    run_tagged,
)
from fedq.simulations.harness import (
    PRODUCT_CODE,
    Benchmark,
    Cell,
    CellKind,
    Done,
    HarnessError,
    Summary,
    name_list,
    register_benchmark,
)
from fedq.simulations.results_io import spread

CRASHES = ("serverapp-kill", "superlink-restart")
REMEDIES = ("resubmit", "stop-then-resubmit")
_STARTED = re.compile(r"Successfully started run (\d+)")
WAITED_S = 10.0
"""A resumed round 2 longer than this waited for the crashed run's heartbeat to expire
(the other rounds take 1-4 s here; the wait is ~50 s): the wait happens only when the
crash caught a round's message half pushed, so the table counts the runs that waited."""


def _wait_for(path: Path, alive: threading.Thread, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive.is_alive() or time.monotonic() > deadline:
            raise HarnessError(f"resume_wait: {what} never appeared ({path})")
        time.sleep(0.1)


def metrics_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a run's ``metrics.jsonl``, strictly: a line that is not a JSON object
    is a torn or garbled write the resume should never leave, so it fails the cell naming
    the file and line instead of being skipped (a skipped line would hide a lost round)."""
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise HarnessError(f"{path}:{number}: not a metrics row: {line[:80]!r}")
        kept.append(row)
    return kept


def stop_started_run(link: SuperLinkHandle, submit_log: Path) -> str:
    """``flwr stop`` the run that ``fedq-submit`` logged starting in ``submit_log`` (the
    operator's recipe after a crash, docs/durability.md); returns its run id."""
    found = _STARTED.search(submit_log.read_text())
    if found is None:
        raise HarnessError(f"{submit_log} names no run to stop")
    stop = run_tagged(link, ["flwr", "stop", found.group(1), link.connection], timeout=60)
    if stop.returncode != 0:
        raise HarnessError(f"flwr stop {found.group(1)} failed: {stop.stdout!r}")
    return found.group(1)


def run_crash(params: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """One crash of ``params["crash"]`` after round 1, then the resumed run."""
    crash, remedy = params["crash"], params["remedy"]
    run = {**TINY_RUN, "backend": "numpy", "local-steps": params["local-steps"],
           "num-server-rounds": params["rounds"], "round-timeout": 120, "seed": params["seed"]}
    with compose_topology(workdir, database=workdir / "superlink.db") as topology:
        run_dir = topology.workdir / "run"
        crashed: dict[str, int] = {}
        first = threading.Thread(daemon=True, target=lambda: crashed.setdefault(
            "code", topology.submit(run_dir, run, log_name="submit-1.log", timeout=600)))
        first.start()
        _wait_for(run_dir / "checkpoints" / "round-0001.pt", first, 400, "round 1's checkpoint")
        crashed_at = time.monotonic()
        if crash == "serverapp-kill":
            if not kill_serverapp(topology.link):
                raise HarnessError("resume_wait: no flwr-serverapp process to kill")
        else:
            restart_superlink(topology.link, kill=True)
        if remedy == "stop-then-resubmit":
            stop_started_run(topology.link, topology.workdir / "submit-1.log")
        resubmitted_at = time.monotonic()
        code = topology.submit(run_dir, {**run, "resume": True}, log_name="submit-2.log",
                               timeout=600)
        done_at = time.monotonic()
        first.join(timeout=180)
    if code != 0:
        raise HarnessError(f"resume_wait {crash}/{remedy}: the resumed run exited {code}; "
                           f"see {topology.workdir / 'submit-2.log'}")
    kept = metrics_rows(run_dir / "metrics.jsonl")
    return {"crash": crash, "remedy": remedy, "repeat": params["repeat"],
            "rounds": [r["round"] for r in kept],
            "round-seconds": [r["round-seconds"] for r in kept],
            "resubmission-seconds": done_at - resubmitted_at,
            "crash-to-done-seconds": done_at - crashed_at,
            "crashed-submit-exit": crashed.get("code")}


RESUME_WAIT = CellKind("resume-wait", run_crash, (
    *PRODUCT_CODE, "fedq.simulations.bench_resume_wait", "fedq.simulations.compose_topology",
    "fedq.simulations.flower_runtime"))


def cells(params: Mapping[str, Any]) -> list[Cell]:
    """Repeat by repeat, every crash and remedy in turn (the order the cells run in)."""
    crashes = name_list(params, "crashes", CRASHES)
    remedies = name_list(params, "remedies", REMEDIES)
    for key in ("repeats", "rounds", "local-steps"):
        if not (isinstance(params[key], int) and params[key] >= 1):
            raise HarnessError(f"{key}: a whole number >= 1, got {params[key]!r}")
    if params["rounds"] < 3:
        raise HarnessError(f"rounds: >= 3 (round 1, the resumed round 2, a later one), "
                           f"got {params['rounds']!r}")
    shared = {k: params[k] for k in ("rounds", "local-steps", "seed")}
    return [Cell(RESUME_WAIT, {"crash": crash, "remedy": remedy, "repeat": repeat, **shared})
            for repeat in range(params["repeats"]) for crash in crashes for remedy in remedies]


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per crash and remedy; the wait as a ratio of the same crash's stopped runs."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["crash"], result["remedy"]), []).append(result)
    first_round = {key: statistics.median(r["round-seconds"][1] for r in runs)
                   for key, runs in groups.items()}
    table = []
    for (crash, remedy), runs in groups.items():
        rounds = len(runs[0]["rounds"])
        stopped = first_round.get((crash, "stop-then-resubmit"))
        table.append({
            "crash": crash, "remedy": remedy, "repeats": len(runs),
            "resumed round 2 s": spread([r["round-seconds"][1] for r in runs]),
            f"waited (round 2 > {WAITED_S:g} s)":
                f"{sum(r['round-seconds'][1] > WAITED_S for r in runs)}/{len(runs)}",
            "vs stop-then-resubmit": first_round[(crash, remedy)] / stopped if stopped else None,
            "rounds 3+ s (median)": statistics.median(
                s for r in runs for s in r["round-seconds"][2:]),
            "resubmission s": spread([r["resubmission-seconds"] for r in runs]),
            "every round once": all(r["rounds"] == list(range(1, rounds + 1)) for r in runs),
            "crashed run's fedq-submit exit": sorted({r["crashed-submit-exit"] for r in runs},
                                                    key=str),
        })
    return table


def summarise(params: Mapping[str, Any], done: Done) -> Summary:
    results = [result for _, result in done]
    table = summary(results)
    return Summary(
        table, list(table[0]),
        f"The compose topology as local processes (SuperLink with its database, 3 "
        f"fedq-supernodes, numpy devices), CartPole-v1, {params['rounds']} rounds x "
        f"{params['local-steps']} local env steps; the crash right after round 1's "
        "checkpoint, then fedq-submit with resume = true (at once, or after flwr stop of "
        "the crashed run). Resumed round 2 s: metrics.jsonl's round-seconds of the first "
        "round the resumed run trains, median [min, max] over repeats; waited: how many of "
        f"them took over {WAITED_S:g} s (the crash caught a message half pushed; the others "
        "do not wait, so the median hides it); vs stop-then-resubmit: "
        "that median over the same crash's stopped runs' median, in the same invocation. "
        "Resubmission s: fedq-submit's wall time from the resubmission (after the stop, "
        "if any) to the run's end. The crashed run's fedq-submit exit: 1 = it reported "
        "the run as not completed. Why the wait: docs/durability.md.",
        payload={"runs": results})


register_benchmark(Benchmark(
    "resume_wait", "a resumed run's first round after a ServerApp kill or SuperLink "
    "restart, resubmitted at once vs after flwr stop of the crashed run (compose topology)",
    defaults={"crashes": ",".join(CRASHES), "remedies": ",".join(REMEDIES), "repeats": 5,
              "rounds": 3, "local-steps": 200, "seed": 0},
    quick={"crashes": "serverapp-kill", "remedies": "stop-then-resubmit", "repeats": 1},
    cells=cells, summarise=summarise, parallel=False))
