"""The round watch (client/round_watch.py): a ClientApp whose SuperNode is gone, or whose
round-timeout has passed, stops its work, saves what it did as a complete generation,
and (in a flwr-clientapp process) ends, instead of running on as an orphan; it never
ends the process in the middle of a save."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from _replies import device_context, instruction
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedq.client.client_app import app
from fedq.client.round_watch import EXIT_CODE, ROUND_STOPPED_ERROR_CODE, RoundWatch
from fedq.common.config import FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.state_store import generations

TESTS = Path(__file__).resolve().parent
SMALL = {"hidden-sizes": "16,16", "buffer-size": 500, "batch-size": 16,
         "learning-starts": 50, "train-frequency": 4, "exploration-steps": 300}
ENDLESS = 10**7  # local steps no test waits for


def _train_message(local_steps):
    torch.manual_seed(0)
    return instruction(0, "train", RecordDict({
        "arrays": ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict()),
        "config": ConfigRecord({"local-steps": local_steps})}))


def _saved_steps(state_dir):
    complete = [g for g in generations(state_dir) if g.problem is None]
    assert complete, f"no complete generation in {state_dir}"
    return json.loads((complete[0].path / "counters.json").read_text())["env_steps"]


def test_a_round_past_its_timeout_stops_saves_its_work_and_says_so(tmp_path):
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path),
                  "round-timeout": 1.0}
    started = time.monotonic()
    reply = app(_train_message(ENDLESS), device_context(0, run_config))
    assert time.monotonic() - started < 30
    assert reply.has_error() and reply.error.code == ROUND_STOPPED_ERROR_CODE
    assert "device partition-0: stopped after" in reply.error.reason
    assert "round-timeout (1s) has passed" in reply.error.reason
    steps = int(reply.error.reason.split("stopped after ")[1].split(" of")[0])
    assert 0 < steps < ENDLESS
    assert _saved_steps(tmp_path / "devices" / "partition-0") == steps


_SUPERNODE = """\
#!{python}
# stands in for flower-supernode: starts one ClientApp process, then idles
import subprocess, sys, time
child = subprocess.Popen([sys.executable, {child!r}])
open({pid_file!r}, "w").write(str(child.pid))
time.sleep(3600)
"""

_CLIENTAPP = """\
import json, sys
sys.path.insert(0, {tests!r})
from _replies import device_context, instruction
from test_round_watch import _train_message
from fedq.client.client_app import app
open({ready!r}, "w").write("training")
run_config = json.loads(open({run_config!r}).read())
app(_train_message({steps}), device_context(0, run_config))
print("handler returned; the process would now try to deliver its reply", flush=True)
import time
time.sleep(3600)
"""


def test_a_clientapp_whose_supernode_is_killed_saves_and_ends(tmp_path):
    """A real process tree: a ``flower-supernode`` stand-in and its ClientApp process,
    training a round that would take hours. The node is killed -9; the ClientApp stops
    within seconds, saves the steps it did as a complete generation, and exits."""
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path / "run")}
    supernode, child = tmp_path / "flower-supernode", tmp_path / "clientapp.py"
    pid_file, ready = tmp_path / "clientapp.pid", tmp_path / "ready"
    (tmp_path / "run-config.json").write_text(json.dumps(run_config))
    child.write_text(_CLIENTAPP.format(tests=str(TESTS), ready=str(ready), steps=ENDLESS,
                                       run_config=str(tmp_path / "run-config.json")))
    supernode.write_text(_SUPERNODE.format(python=sys.executable, child=str(child),
                                           pid_file=str(pid_file)))
    supernode.chmod(0o755)
    log = (tmp_path / "clientapp.log").open("w")
    node = subprocess.Popen([sys.executable, str(supernode)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "clientapp.log").read_text()
        clientapp = int(pid_file.read_text())
        time.sleep(3)  # mid-training
        node.kill()
        node.wait()
        ended = time.monotonic()
        while Path(f"/proc/{clientapp}").exists() and time.monotonic() - ended < 60:
            time.sleep(0.1)
        assert not Path(f"/proc/{clientapp}").exists(), "the orphaned ClientApp ran on"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole tree, whatever happened
            os.killpg(node.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "clientapp.log").read_text()
    assert "[fedq] round watch: partition-0" in output
    assert "is gone" in output
    assert f"ending ClientApp pid {clientapp}" in output
    assert 0 < _saved_steps(tmp_path / "run" / "devices" / "partition-0") < ENDLESS


def test_the_watch_never_ends_the_process_in_the_middle_of_a_save():
    ended: list[int] = []
    gone_parent = (2**22 + 7, 1)  # no such process: the parent is gone
    watch = RoundWatch(None, ancestors=[gone_parent], poll_s=0.02, grace_s=0.0,
                       end_process=ended.append)
    saving = threading.Event()

    def save():
        with watch.saving():
            saving.set()
            time.sleep(0.6)

    saver = threading.Thread(target=save)
    saver.start()
    saving.wait()
    watch.start()
    time.sleep(0.3)
    assert watch.should_stop() and ended == []  # asked to stop, but mid-save: not ended
    saver.join()
    deadline = time.monotonic() + 5
    while not ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ended == [EXIT_CODE]
    watch.close()
