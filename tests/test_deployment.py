"""The docker-compose.yml federation run as real local processes on 127.0.0.1.

A real ``flower-superlink``, the compose file's three ``flower-supernode``s with their
node configs (read from the compose file) and the run submitted with the submit
service's own ``fedq-submit`` command line. Protects that the deployed federation
trains and writes its outputs, survives the ServerApp crashing (the crashed run stopped
with ``flwr stop``, a resubmitted run with resume=true continues at the round after the
last checkpoint without waiting, metrics without gaps or duplicates), survives a
SuperNode losing power mid-round (the round ends with the devices that answered; the
restarted device continues from its own disk), and that with TLS and node
authentication on, registered nodes train and an unknown node is refused.

Two topologies (plain, TLS + auth), shared by the tests of each, keep the Flower process
time to a few minutes.
"""

import json
import threading
import time

import pytest

from fedq.common.certs import make_supernode_auth_keys, make_tls_files
from fedq.common.device_key import DEVICE_KEY
from fedq.simulations.bench_resume_wait import metrics_rows, stop_started_run
from fedq.simulations.compose_topology import TINY_RUN, compose_topology
from fedq.simulations.flower_runtime import kill_serverapp, start_supernode

pytestmark = pytest.mark.slow

# The numpy learner: what is protected here (rounds, resume, power loss, TLS, auth,
# node order) is the deployment's, not the learner's, and a torch device pays ~8 s of
# torch imports per ClientApp process (docs/benchmarks.md, cost of a deployed round).
# torch devices behind real SuperNodes: tests/test_edge_recipe.py and
# test_curious_server_deployed.py.
RUN = {**TINY_RUN, "backend": "numpy"}


def _counters(state_dir):
    generation = (state_dir / "CURRENT").read_text().strip()
    return json.loads((state_dir / generation / "counters.json").read_text())


def _log_since(node, offset):
    with node.log_path.open("rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with compose_topology(tmp_path_factory.mktemp("compose")) as topology:
        yield topology


@pytest.fixture(scope="module")
def plain_run(plain):
    """A 3-round run whose ServerApp is SIGKILLed after round 1, then resubmitted."""
    run_dir = plain.workdir / "run"
    overrides = {**RUN, "num-server-rounds": 3, "round-timeout": 120}
    outcome = {}
    first = threading.Thread(target=lambda: outcome.setdefault(
        "first", plain.submit(run_dir, overrides, log_name="submit-1.log")))
    first.start()
    deadline = time.monotonic() + 400
    while not (run_dir / "checkpoints" / "round-0001.pt").exists():
        assert first.is_alive() and time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.2)
    killed = kill_serverapp(plain.link)
    rows_after_crash = [r["round"] for r in metrics_rows(run_dir / "metrics.jsonl")]
    # the operator's recipe (docs/durability.md): stop the crashed run, then resubmit.
    # Flower marks it failed by itself only when the dead ServerApp's heartbeat expires
    # (~60 s), and until then each SuperNode keeps retrying the objects of the message the
    # ServerApp died pushing, so the resumed run's first round waited ~52 s for it
    stop_started_run(plain.link, plain.workdir / "submit-1.log")
    outcome["resumed"] = plain.submit(run_dir, {**overrides, "resume": True},
                                      log_name="submit-2.log")
    first.join()
    return run_dir, killed, outcome, rows_after_crash


def test_compose_federation_trains_and_writes_checkpoints_and_metrics(plain_run):
    run_dir, _, outcome, _ = plain_run
    assert outcome["resumed"] == 0, "see submit-2.log"
    rows = metrics_rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["train"]["clients"] == 3 and row["eval"]["clients"] == 3
        assert row["participation"]["train"] == {"sampled": 3, "replied": 3, "errors": 0,
                                                 "missing": 0}
    assert (run_dir / "checkpoints" / "round-0003.pt").exists()
    assert json.loads((run_dir / "config.json").read_text())["min-available-clients"] == 3


def test_server_crash_then_resume_continues_at_the_next_round(plain_run):
    run_dir, killed, outcome, rows_after_crash = plain_run
    assert killed, "no flwr-serverapp process was running"
    assert outcome["first"] == 1, "fedq-submit must report the crashed run as not completed"
    assert rows_after_crash[0] == 1 and len(rows_after_crash) <= 2
    rows = metrics_rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]  # no round lost or repeated
    # the crashed run stopped, no device waits for the message its ServerApp died sending
    assert rows[1]["round-seconds"] < 30, rows[1]["round-seconds"]
    steps = [r["env-steps-per-client-total"] for r in rows]
    assert steps == [200, 400, 600]
    client_rounds = [(r["round"], r["phase"]) for r in metrics_rows(run_dir / "clients.jsonl")]
    assert sorted(set(client_rounds)) == [(n, p) for n in (1, 2, 3)
                                          for p in ("evaluate", "train")]
    assert len(client_rounds) == 3 * 2 * 3  # every device once per round and phase


def test_device_killed_mid_round_does_not_stall_and_rejoins_with_its_state(plain, plain_run):
    run_dir = plain_run[0]
    victim = plain.nodes["supernode-2"]
    overrides = {**RUN, "num-server-rounds": 5, "round-timeout": 120, "resume": True}
    offset = victim.log_path.stat().st_size
    outcome = {}
    run = threading.Thread(target=lambda: outcome.setdefault(
        "code", plain.submit(run_dir, overrides, log_name="submit-3.log")))
    run.start()
    deadline = time.monotonic() + 300
    while "Receiving: train message" not in _log_since(victim, offset):
        assert run.is_alive() and time.monotonic() < deadline, "round 4 never reached node 2"
        time.sleep(0.1)
    victim.stop(kill=True)  # power loss in the middle of round 4's local training
    on_disk = _counters(plain.state_dirs["supernode-2"])
    victim.start()
    new_id = victim.wait_registered(timeout=120)
    run.join()
    assert outcome["code"] == 0, "see submit-3.log"

    rows = metrics_rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    round4 = rows[3]["participation"]["train"]
    assert round4["sampled"] == 3 and round4["replied"] == 2  # went on without node 2
    assert rows[3]["train"]["clients"] == 2
    replies = [r for r in metrics_rows(run_dir / "clients.jsonl")
               if r["node-id"] == new_id and r["phase"] == "train"]
    assert [r["round"] for r in replies] == [5]
    # the restarted device loaded its replay buffer and counters from its state dir
    assert replies[0]["env-steps-total"] == on_disk["env_steps"] + RUN["local-steps"]
    assert replies[0]["rounds-total"] == on_disk["rounds"] + 1


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compose-tls")
    # the compose service name and loopback, as fedq-certs writes them for compose
    tls = make_tls_files(workdir / "certs", sans=("superlink", "127.0.0.1"))
    with compose_topology(workdir, tls=tls, auth=True) as topology:
        yield topology


def test_node_without_registered_key_is_refused(secured):
    rogue_key, _ = make_supernode_auth_keys(secured.workdir / "rogue", "rogue")
    rogue = start_supernode(secured.link, secured.workdir / "rogue",
                            {"state-dir": str(secured.workdir / "rogue" / "state")},
                            auth_private_key=rogue_key, name="rogue", max_wait_time=20)
    with pytest.raises((RuntimeError, TimeoutError)):
        rogue.wait_registered(timeout=60)
    rogue.stop(kill=True)
    log = rogue.log_path.read_text()
    # same CA and flags as the registered nodes that trained: only the key differs
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log


def test_tls_and_node_auth_federation_chains_real_supernodes_in_device_order(secured):
    """Registered nodes train over TLS with node authentication, here with the sequential
    strategy (one run for both: FedAvg's deployed rounds are the plain topology's tests).
    Real devices have no partition id: the server queries them, then visits them in
    device-key order (node id only breaks ties; node ids are drawn at random, so sorting
    by them alone made this test pass or fail by chance), each starting from the model
    the previous one trained (with the federation clock, its epsilon starts at the env
    steps already in that model)."""
    run_dir = secured.workdir / "run-sequential"
    steps = RUN["local-steps"]
    code = secured.submit(run_dir, {**RUN, "num-server-rounds": 2, "round-timeout": 120,
                                    "strategy": "sequential",
                                    "exploration-clock": "federation",
                                    "exploration-steps": 4000}, log_name="submit-seq.log")
    assert code == 0, "see submit-seq.log"
    rows = metrics_rows(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train"]["clients"] == 3 for r in rows)
    assert "insecure" not in secured.link.log_path.read_text().lower()
    assert [r["env-steps-federation-total"] for r in rows] == [3 * steps, 6 * steps]
    trained = sorted((r["round"], r[DEVICE_KEY], r["node-id"], r["epsilon"])
                     for r in metrics_rows(run_dir / "clients.jsonl") if r["phase"] == "train")
    assert len(trained) == 6
    for visit, (*_, epsilon) in enumerate(trained):  # rounds, then the visiting order
        assert epsilon == pytest.approx(1.0 - 0.98 * (visit + 1) * steps / 4000)
