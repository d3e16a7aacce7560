"""``fedq-supernode`` (client/supernode.py): Flower's SuperNode polling promptly.

Protects that a real ``fedq-supernode`` connected to a real SuperLink on 127.0.0.1 pulls
for messages every ``FEDQ_SUPERNODE_POLL_S`` (0.2 s) rather than Flower's 3 s, counted in
the SuperLink's own access log, that its SuperExec child looks for work just as often,
that a bad interval is refused naming the variable, and that the ``flwr-clientapp`` it
puts on its children's PATH is Flower's without the SuperNode's imports
(client/clientapp_launcher.py).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedq.client.clientapp_launcher import MESSAGE_PULL_ENV, write_launcher
from fedq.client.handoff import BellSleepTime
from fedq.client.supernode import (
    FAST_POLL_ENV,
    FAST_WINDOW_ENV,
    POLL_ENV,
    SUPEREXEC_POLL_ENV,
    burst,
    poll_interval,
    use_clientapp_launcher,
)
from fedq.client.warm_executor import WARM_ENV
from fedq.simulations.flower_runtime import deployment_superlink, node_pids, start_supernode


def _pulls(log: Path) -> int:
    return log.read_text(errors="replace").count("/v1/fleet/pull-messages")


def test_a_real_fedq_supernode_polls_the_superlink_every_fifth_of_a_second(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")  # the SuperLink logs every pull
    monkeypatch.delenv(POLL_ENV, raising=False)
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setenv(WARM_ENV, "0")  # Flower's SuperExec, whose environment is checked
    with deployment_superlink(tmp_path / "link") as link:
        node = start_supernode(link, tmp_path / "node", {"seed": 1}, program="fedq-supernode")
        node.wait_registered(timeout=120)
        before, started = _pulls(link.log_path), time.monotonic()
        time.sleep(3.0)
        pulls = _pulls(link.log_path) - before
        elapsed = time.monotonic() - started
        superexec = node_pids(node, "flower-superexec")
        environ = Path(f"/proc/{superexec[0]}/environ").read_bytes().split(b"\0")
    # flower-supernode pulls once per 3 s when idle; 0.2 s gives ~15 (load slows it)
    assert pulls >= 8, f"{pulls} pulls in {elapsed:.1f} s"
    assert f"{SUPEREXEC_POLL_ENV}=0.2".encode() in environ


def test_capped_sleep_caps_only_sleep():
    capped = BellSleepTime(0.01)
    started = time.monotonic()
    capped.sleep(3)
    assert time.monotonic() - started < 1.0
    assert capped.monotonic is time.monotonic  # every other function is the real one


@pytest.mark.parametrize(("raw", "expected"), [(None, 0.2), ("", 0.2), ("0.05", 0.05)])
def test_poll_interval_reads_the_environment(raw, expected):
    assert poll_interval({} if raw is None else {POLL_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "nan", "10"])
def test_a_bad_poll_interval_is_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=POLL_ENV):
        poll_interval({POLL_ENV: raw})


def test_the_polling_burst_after_a_reply_is_configurable_and_can_be_turned_off():
    default = burst({})
    assert (default.fast_s, default.window_s) == (0.02, 1.0)
    chosen = burst({FAST_POLL_ENV: "0.05", FAST_WINDOW_ENV: "2.5"})
    assert (chosen.fast_s, chosen.window_s) == (0.05, 2.5)
    assert burst({FAST_WINDOW_ENV: "0"}) is None


@pytest.mark.parametrize(("name", "raw"), [(FAST_POLL_ENV, "0"), (FAST_POLL_ENV, "soon"),
                                           (FAST_WINDOW_ENV, "-1"), (FAST_WINDOW_ENV, "nan"),
                                           (FAST_WINDOW_ENV, "600")])
def test_a_bad_burst_setting_is_refused_naming_the_variable(name, raw):
    with pytest.raises(ValueError, match=name):
        burst({name: raw})


def test_the_clientapp_launcher_runs_flowers_clientapp_without_the_supernode_imports(
        tmp_path):
    launcher = write_launcher(tmp_path / "bin")
    done = subprocess.run([sys.executable, "-X", "importtime", str(launcher), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Run a Flower ClientApp" in done.stdout  # Flower's own flwr-clientapp parser
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "flwr.supernode.cli.flwr_clientapp" in imported
    # what Flower's console script imports on top, per message: the SuperNode's CLI and
    # its SQL object store
    assert not imported & {"flwr.supernode.cli.flower_supernode", "sqlalchemy", "alembic"}


def test_fedq_supernode_puts_the_launcher_first_on_path(tmp_path):
    environ = {"FLWR_HOME": str(tmp_path), "PATH": "/usr/bin"}
    directory = use_clientapp_launcher(environ)
    assert environ["PATH"].split(os.pathsep) == [str(directory), "/usr/bin"]
    assert shutil.which("flwr-clientapp", path=environ["PATH"]) == \
        str(tmp_path / "fedq-bin" / "flwr-clientapp")


def test_fedq_supernode_refuses_a_bad_message_pull_limit_before_it_starts(tmp_path):
    """Its ClientApps read FEDQ_MESSAGE_PULL_LIMIT_S per message; a bad value stops the
    device at start, naming the variable, not at its first round."""
    program = Path(sys.executable).parent / "fedq-supernode"
    done = subprocess.run([str(program), "--superlink", "127.0.0.1:9", "--insecure"],
                          env={**os.environ, MESSAGE_PULL_ENV: "forever",
                               "FLWR_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"fedq-supernode: error: {MESSAGE_PULL_ENV}='forever'" in done.stderr
