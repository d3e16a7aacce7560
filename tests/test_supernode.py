"""``fedq-supernode`` (client/supernode.py): Flower's SuperNode polling promptly.

Protects that a real ``fedq-supernode`` connected to a real SuperLink on 127.0.0.1 pulls
for messages every ``FEDQ_SUPERNODE_POLL_S`` (0.2 s) rather than Flower's 3 s, counted in
the SuperLink's own access log, that its SuperExec child looks for work just as often,
and that a bad interval is refused naming the variable.
"""

import time
from pathlib import Path

import pytest

from fedq.client.supernode import (
    POLL_ENV,
    SUPEREXEC_POLL_ENV,
    CappedSleepTime,
    poll_interval,
)
from fedq.simulations.flower_runtime import deployment_superlink, node_pids, start_supernode


def _pulls(log: Path) -> int:
    return log.read_text(errors="replace").count("/v1/fleet/pull-messages")


def test_a_real_fedq_supernode_polls_the_superlink_every_fifth_of_a_second(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")  # the SuperLink logs every pull
    monkeypatch.delenv(POLL_ENV, raising=False)
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
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
    capped = CappedSleepTime(0.01)
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
