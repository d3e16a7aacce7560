"""The curious server against real SuperNodes: a device's privacy policy, set in its own
node config, holds when the run comes through a real SuperLink (issue 17).

One deployment SuperLink and two ``flower-supernode`` processes on 127.0.0.1: device
``bound`` requires DP (``privacy-dp-required``) and audits its own replies; device ``free``
sets no policy. The server's run config switches DP off and points the devices' message
audit at a directory of its choosing. The bound device must answer its train message with
Flower error code 1002, which the server logs and writes to ``privacy.jsonl``; the free
device trains; neither device writes where the server asked.

And a device started by ``fedq-client --trusted-entities`` runs no app bundle that none of
its trusted keys signed: against a self-hosted SuperLink (which delivers no signatures)
it answers every message with Flower's FAB verification error and touches no state.
"""

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedq.client.edge import device_node_config, supernode_command, write_node_config
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE
from fedq.simulations.compose_topology import TINY_RUN
from fedq.simulations.flower_runtime import (
    SuperNode,
    deployment_superlink,
    start_supernode,
    submit_run,
)
from fedq.simulations.run import APP_DIR

pytestmark = pytest.mark.slow


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_real_device_refuses_a_run_config_that_switches_its_dp_off(tmp_path):
    run_dir, server_chosen, own_audit = (tmp_path / "run", tmp_path / "server-audit",
                                         tmp_path / "bound-audit")
    with deployment_superlink(tmp_path / "link") as link:
        bound = start_supernode(link, tmp_path / "bound", {
            "state-dir": str(tmp_path / "bound-state"), "privacy-dp-required": True,
            "message-audit-dir": str(own_audit)}, name="bound")
        free = start_supernode(link, tmp_path / "free",
                               {"state-dir": str(tmp_path / "free-state")}, name="free")
        bound_id, free_id = bound.wait_registered(120), free.wait_registered(120)
        result = submit_run(link, APP_DIR, stream=False, timeout=600,
                            log_path=tmp_path / "run.log", run_config={
                                **TINY_RUN, "num-server-rounds": 1, "round-timeout": 120,
                                "min-available-clients": 2, "dp-enabled": False,
                                "run-dir": str(run_dir),
                                "message-audit-dir": str(server_chosen)})
    assert result.ok, result.output[-3000:]
    (row,) = _rows(run_dir / "metrics.jsonl")
    assert row["train"]["clients"] == 1 and row["privacy"]["refused-nodes"] == [bound_id]
    (refused,) = _rows(run_dir / "privacy.jsonl")
    assert refused["node-id"] == bound_id and refused["status"] == "refused"
    assert "privacy-dp-required" in refused["reason"]
    assert f"node {bound_id} refused the train message" in result.output
    train = {r["node-id"]: r for r in _rows(run_dir / "clients.jsonl") if r["phase"] == "train"}
    assert train[bound_id]["error"].startswith(f"{PRIVACY_POLICY_ERROR_CODE}: privacy policy")
    assert "error" not in train[free_id]
    # the bound device kept no trained state; the free one did
    assert not (tmp_path / "bound-state" / "CURRENT").exists()
    assert (tmp_path / "free-state" / "CURRENT").exists()
    assert not server_chosen.exists()  # the server does not pick where devices write
    sent = [json.loads(p.read_text()) for p in own_audit.glob("*.json")]
    errors = [m["error"] for m in sent if m["error"] is not None]
    assert [e["code"] for e in errors] == [PRIVACY_POLICY_ERROR_CODE]
    assert {m["message-type"] for m in sent} == {"train", "evaluate"}


def test_a_device_that_requires_signed_apps_runs_no_unsigned_one(tmp_path):
    public = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f"fpk_owner: '{public}'\n")
    state, run_dir = tmp_path / "state", tmp_path / "run"
    node_config = write_node_config(state, device_node_config(None, [], state))
    with deployment_superlink(tmp_path / "link") as link:
        # fedq-client's own flower-supernode command line (it execs into that command)
        tail = supernode_command(link.address, node_config, root_certificates=None,
                                 auth_key=None, insecure=True, max_wait_time=None,
                                 trusted_entities=trusted)[1:]
        (tmp_path / "node").mkdir()
        node = SuperNode(link, "signed-only", tmp_path / "node", tail,
                         {**link._env, "FLWR_HOME": str(state / "flwr-home")})
        node.start()
        try:
            node_id = node.wait_registered(120)
            result = submit_run(link, APP_DIR, stream=False, timeout=300,
                                log_path=tmp_path / "run.log", run_config={
                                    **TINY_RUN, "num-server-rounds": 1, "round-timeout": 60,
                                    "run-dir": str(run_dir)})
        finally:
            node.stop()
    # its only device refused every message, so the run's one round failed and the run
    # ends failed (server/outcome.py), with the refusal on record
    assert not result.ok and result.status == "finished:failed", result.output[-3000:]
    assert "[fedq] run status: failed" in result.output
    (row,) = _rows(run_dir / "metrics.jsonl")
    assert row["train"]["clients"] == 0 and row["participation"]["train"]["errors"] == 1
    (train,) = [r for r in _rows(run_dir / "clients.jsonl") if r["phase"] == "train"]
    assert train["node-id"] == node_id and "could not be verified" in train["error"]
    assert "FAB could not be verified" in node.log_path.read_text()
    assert not (state / "CURRENT").exists()  # no fedq code ran on the device
