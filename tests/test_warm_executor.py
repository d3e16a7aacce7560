"""fedq's warm ClientApp executor (client/warm_executor.py), driven by real processes.

Protects that ``fedq-supernode`` serves every message of a deployed run from one
long-lived fork server per device: rounds complete on a real SuperLink and three real
``fedq-supernode``\\ s on 127.0.0.1; each device has one fork server and one task loop for
the whole run and no Flower SuperExec or ``flwr-clientapp`` process; every message ran
in a child forked from that fork server without an ``exec`` (the same command line as
the SuperNode, so it started with the imports already done). A child SIGKILLed while
it trains yields, for that device and round, an error reply naming what happened
(code ``CLIENTAPP_DIED_ERROR_CODE``) instead of a round that waits for its timeout, and
the device trains again the next round. Also the small pure helpers: the switch, the
argument rewrite, the launch encoding.
"""

import json
import os
import select
import signal
import threading
import time
from pathlib import Path

import pytest

from fedq.client.warm_executor import (
    CLIENTAPP_DIED_ERROR_CODE,
    DIED_REASON_PREFIX,
    FORK_SERVER_NAME,
    TASK_LOOP_NAME,
    TASK_NAME,
    WARM_ENV,
    Launch,
    enabled,
    process_isolation,
)
from fedq.simulations.compose_topology import TINY_RUN, compose_topology
from fedq.simulations.flower_runtime import node_pids

ROUNDS = 3


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpu_ticks(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class _Census(threading.Thread):
    """Every process of each node's tree seen while the run lasts: pid -> (comm, ppid,
    command line), its comm as last seen (a fork has its parent's until it names itself)."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.seen = {name: {} for name in nodes}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for name, node in self.nodes.items():
                for pid in node_pids(node):
                    comm, stat = _read(f"/proc/{pid}/comm"), _read(f"/proc/{pid}/stat")
                    cmdline = _read(f"/proc/{pid}/cmdline")
                    if comm and stat and cmdline:  # a zombie's command line reads empty
                        ppid = int(stat.rsplit(")", 1)[1].split()[1])
                        self.seen[name][pid] = (comm.strip(), ppid, cmdline)
            time.sleep(0.03)


@pytest.mark.slow
def test_rounds_run_in_children_forked_from_one_warm_executor_and_a_killed_one_is_named(
        tmp_path):
    run_dir = tmp_path / "run"
    victim: dict[str, int] = {}
    with compose_topology(tmp_path, node_extra={"backend": "numpy"}) as topology:
        for node in topology.nodes.values():
            node.wait_registered(timeout=180)
        roots = {name: node.process.pid for name, node in topology.nodes.items()}
        census = _Census(topology.nodes)
        census.start()

        def kill_one_training_child():
            # the first of supernode-1's ClientApp children seen training
            while "pid" not in victim:
                for pid in node_pids(topology.nodes["supernode-1"]):
                    if ((_read(f"/proc/{pid}/comm") or "").strip() == TASK_NAME
                            and _cpu_ticks(pid) > 10):
                        try:
                            os.kill(pid, signal.SIGKILL)
                            victim["pid"] = pid
                        except ProcessLookupError:
                            continue
                        break
                time.sleep(0.02)

        killer = threading.Thread(target=kill_one_training_child, daemon=True)
        killer.start()
        code = topology.submit(run_dir, {**TINY_RUN, "local-steps": 3000,
                                         "num-server-rounds": ROUNDS, "backend": "numpy",
                                         "round-timeout": 120},
                               log_name="submit.log", timeout=900)
        census.stop.set()
        census.join()
        killer.join(timeout=1)
    assert code == 0, (tmp_path / "submit.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))

    for name, seen in census.seen.items():
        kinds = {}
        for pid, (comm, _ppid, _cmd) in seen.items():
            kinds.setdefault(comm, []).append(pid)
        # one fork server and one task loop per device, for the whole run; no process
        # per message of Flower's own
        assert len(kinds.get(FORK_SERVER_NAME, [])) == 1, (name, kinds)
        assert len(kinds.get(TASK_LOOP_NAME, [])) == 1, (name, kinds)
        assert not {"flower-superexe", "flwr-clientapp"} & set(kinds), (name, kinds)
        fork_server = kinds[FORK_SERVER_NAME][0]
        root_cmdline = seen[roots[name]][2]
        # (a child's own subprocesses carry its name until they exec: not counted)
        children = [pid for pid in kinds.get(TASK_NAME, []) if seen[pid][1] == fork_server]
        assert len(children) >= ROUNDS, (name, kinds)  # fused: one message per round (+1)
        for pid in children:
            _comm, ppid, cmdline = seen[pid]
            # forked by the fork server and never exec'd: it runs the SuperNode's own
            # program image, whose fork server had imported the ClientApp already
            assert ppid == fork_server
            assert cmdline == root_cmdline

    assert "pid" in victim, "no training ClientApp child was seen to kill"
    failures = [(r, f) for r in rows for f in r["device-failures"]
                if f["code"] == CLIENTAPP_DIED_ERROR_CODE]
    assert len(failures) == 1, [(r["round"], r["device-failures"]) for r in rows]
    killed_round, failure = failures[0]
    assert killed_round["round"] < ROUNDS, "killed in the last round: nothing to rejoin"
    assert failure["error"].startswith(DIED_REASON_PREFIX)
    assert f"{victim['pid']}" in failure["error"] and "SIGKILL" in failure["error"]
    # the round did not wait for its timeout, and the device trained again next round
    assert killed_round["round-seconds"] < 60
    assert rows[killed_round["round"]]["train"]["clients"] == 3


def test_the_warm_executor_switch_accepts_only_0_or_1():
    assert enabled({}) and enabled({WARM_ENV: "1"}) and not enabled({WARM_ENV: "0"})
    with pytest.raises(ValueError, match=WARM_ENV):
        enabled({WARM_ENV: "yes"})


def test_the_supernode_is_switched_to_process_isolation_whatever_it_was_given():
    assert process_isolation(["--insecure", "--isolation", "subprocess", "--port", "1"]) == [
        "--insecure", "--port", "1", "--isolation", "process"]
    assert process_isolation(["--isolation=subprocess"]) == ["--isolation", "process"]
    assert process_isolation([]) == ["--isolation", "process"]


def test_a_launch_is_one_atomic_line_on_a_pipe():
    launch = Launch("t" * 64, 2**63 - 1, "127.0.0.1:9094", False, "/certs/ca.pem", True, 42)
    line = launch.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) < select.PIPE_BUF  # writes up to PIPE_BUF bytes never interleave
    assert Launch(**json.loads(line)) == launch
