"""Stopping ``fedq-submit`` (SIGTERM from ``docker stop`` or a service manager, Ctrl-C
from a user) stops what it submitted: ``flwr run --stream`` only follows a run, so without
care the run and its ServerApp would go on training on the SuperLink with nobody
watching. Runs a real deployment SuperLink on 127.0.0.1 and a real ``fedq-submit``."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedq.server.run_status import poll_run_status
from fedq.simulations.flower_runtime import _flwr, deployment_superlink

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sigterm_to_fedq_submit_stops_the_run_on_the_superlink(tmp_path):
    with deployment_superlink(tmp_path / "link") as link:
        home = tmp_path / "submit-home"
        env = {**os.environ, "FLWR_HOME": str(home),
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
        # no SuperNode joins: the run starts and waits for its devices
        submit = subprocess.Popen(
            [sys.executable, "-m", "fedq.server.submit", "--superlink", link.address, "--insecure",
             "--app", str(ROOT), "--set", f"run-dir={tmp_path / 'run'}",
             "--set", "min-available-clients=1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            lines = []
            deadline = time.monotonic() + 300
            assert submit.stdout is not None
            while time.monotonic() < deadline:
                line = submit.stdout.readline()
                lines.append(line)
                if "Successfully started run" in line or not line:
                    break
            started = re.search(r"Successfully started run (\d+)", "".join(lines))
            assert started, "".join(lines)
            run_id = int(started.group(1))
            submit.send_signal(signal.SIGTERM)
            output, _ = submit.communicate(timeout=120)
        finally:
            if submit.poll() is None:
                os.killpg(submit.pid, signal.SIGKILL)
        assert submit.returncode == 143, "".join(lines) + output
        assert f"run {run_id} stopped on the SuperLink" in output
        status, _ = poll_run_status(lambda: _flwr(
            link, ["ls", link.connection, "--run-id", str(run_id), "--format", "json"],
            timeout=60.0).stdout, attempts=10)
        assert status == "finished:stopped"
