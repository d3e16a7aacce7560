"""A run that stops while a device is receiving one of its messages leaves no ClientApp
behind (client/clientapp_launcher.py's pull bound), on real processes.

The fault drill once found ClientApps that outlived their run by 6-12 minutes
(docs/durability.md): when a run stops while a SuperNode pulls a message's objects, Flower
1.42 has already stored the message and created its task, logs "Run ID ... is not in
RUNNING status. Ignoring message" and leaves both; the ClientApp launched for the task
waits for objects that never come, up to ~80 minutes, before any fedq code runs.

The test makes the race certain: a ``sitecustomize`` delays each SuperNode's own object
pull by a few seconds (only in ``fedq-supernode`` processes), and the run is stopped
(``flwr stop``) as soon as a node receives the first train message, so it has stopped when
the delayed pull asks for the objects. Every ClientApp launched for such a message must give
its task up within ``FEDQ_MESSAGE_PULL_LIMIT_S`` and end, saying why.
"""

import re
import threading
import time

import pytest

from fedq.client.clientapp_launcher import MESSAGE_PULL_ENV
from fedq.simulations.bench_resume_wait import stop_started_run
from fedq.simulations.compose_topology import TINY_RUN, compose_topology
from fedq.simulations.flower_runtime import node_pids

PULL_DELAY_S = 8.0  # the SuperNode's own pull of a message's objects, delayed
LIMIT_S = 15  # the ClientApp's bound: above the delay, so a live run is not hurt by it

SLOW_PULL = f'''
import sys
if sys.argv and sys.argv[0].endswith("fedq-supernode"):
    import time
    from flwr.supernode import start_client_internal as _module

    _pull = _module.pull_objects

    def _slow_pull(*args, **kwargs):
        time.sleep({PULL_DELAY_S})
        return _pull(*args, **kwargs)

    _module.pull_objects = _slow_pull
'''


def _text(paths):
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


@pytest.mark.slow
def test_a_clientapp_of_a_message_its_run_stopped_receiving_gives_up_and_ends(
        tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_PULL)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv(MESSAGE_PULL_ENV, str(LIMIT_S))
    with compose_topology(tmp_path, node_extra={"backend": "numpy"}) as topology:
        for node in topology.nodes.values():
            node.wait_registered(timeout=180)
        logs = [node.log_path for node in topology.nodes.values()]
        submit = threading.Thread(target=topology.submit, daemon=True, args=(
            tmp_path / "run", {**TINY_RUN, "num-server-rounds": 2, "backend": "numpy"}),
            kwargs={"log_name": "submit.log", "timeout": 300})
        submit.start()
        deadline = time.monotonic() + 240
        while "Receiving: train message" not in _text(logs):
            assert time.monotonic() < deadline, _text(logs)[-3000:]
            time.sleep(0.05)
        stop_started_run(topology.link, topology.workdir / "submit.log")
        stopped = time.monotonic()
        while "gives the task up" not in _text(logs):
            # Flower's own limit is 2 hours; the bound's is LIMIT_S after the pull began
            assert time.monotonic() - stopped < LIMIT_S + 45, _text(logs)[-4000:]
            time.sleep(0.2)
        text = _text(logs)
        assert re.search(r"Run ID \d+ is not in `RUNNING` status\. Ignoring message", text), \
            text[-4000:]
        assert f"did not arrive within {LIMIT_S} s ({MESSAGE_PULL_ENV})" in text
        deadline = time.monotonic() + 30
        while any(node_pids(n, "flwr-clientapp") for n in topology.nodes.values()):
            assert time.monotonic() < deadline, "a ClientApp outlived its given-up task"
            time.sleep(0.2)
        submit.join(timeout=120)
