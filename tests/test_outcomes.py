"""Honest outcomes (server/outcome.py): failures are recorded under the device they
concern and name it and the file, lost work shows in a device's row, and a run whose
devices keep failing does not end as a success."""

import json

import pytest
import torch
from _replies import device_context, instruction
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedq.client.client_app import app
from fedq.common.config import FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.state_store import DEVICE_STATE_ERROR_CODE
from fedq.server.observability import RoundRecorder, client_rows
from fedq.server.outcome import NO_REPLY, phase_failures, round_failed, run_outcome
from fedq.server.run_directory import RunDirectory
from fedq.simulations.run import main

SMALL = {"hidden-sizes": "16,16", "buffer-size": 500, "batch-size": 16,
         "learning-starts": 50, "train-frequency": 4, "exploration-steps": 300}


def _superlink_error(reply_to: str) -> Message:
    """What the SuperLink hands the server for a node it gave up on: sent by node 1."""
    return Message(Error(code=2, reason="node unavailable"), metadata=Metadata(
        run_id=1, message_id="", src_node_id=1, dst_node_id=1, reply_to_message_id=reply_to,
        group_id="1", created_at=0.0, ttl=60.0, message_type="train"))


def _device_reply(node: int, reply_to: str, **metrics) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=1,
        reply_to_message_id=reply_to, group_id="1", created_at=0.0, ttl=60.0,
        message_type="train"))


def test_errors_the_superlink_sends_are_recorded_under_the_device_they_concern():
    rows = client_rows(3, "train", [_superlink_error("sent-to-7"), _superlink_error("sent-to-9")],
                       {"sent-to-7": 7, "sent-to-9": 9}, {7: 2})
    assert [(r["node-id"], r["partition-id"], r["client"]) for r in rows] == [
        (7, 2, "partition-2"), (9, -1, "node-9")]


def test_round_failures_name_every_device_that_erred_or_never_answered():
    failures = phase_failures("train", {"a": 7, "b": 8}, [_superlink_error("a")], {8: 1})
    assert [(f["node-id"], f["partition-id"], f["error"]) for f in failures] == [
        (7, -1, "node unavailable"), (8, 1, NO_REPLY)]
    assert round_failed(failures, sampled=2, accepted=0)
    assert not round_failed(failures, sampled=2, accepted=1)
    declined = [{"phase": "train", "code": 1001}]  # privacy budget: configured, not failed
    assert not round_failed(declined, sampled=1, accepted=0)


@pytest.mark.parametrize(("failed", "threshold", "status"), [
    (0, 0.5, "ok"), (2, 0.5, "degraded"), (3, 0.5, "failed"), (4, 1.0, "degraded"),
    (1, 0.0, "failed")])
def test_the_run_status_follows_the_failed_rounds_threshold(failed, threshold, status):
    rows = [{"round": r, "round-failed": r <= failed,
             "device-failures": [{"node-id": 5}] if r <= failed else []} for r in range(1, 5)]
    assert run_outcome(rows, threshold).status == status


def test_work_a_device_did_for_a_lost_round_shows_in_its_next_row(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.start(FedqConfig.from_mapping({"run-dir": str(tmp_path)}))
    recorder = RoundRecorder(run_dir)
    row = {"env-steps-per-client-total": 100}
    ids = {"i1": 5, "i3": 5}
    recorder.record({**row, "round": 1}, [_device_reply(
        5, "i1", **{"partition-id": 0, "num-examples": 100, "env-steps-total": 100,
                    "rounds-total": 1})], [], ids)
    # round 2's reply was lost after the device trained; round 3 arrives
    recorder.record({**row, "round": 3}, [_device_reply(
        5, "i3", **{"partition-id": 0, "num-examples": 100, "env-steps-total": 300,
                    "rounds-total": 3})], [], ids)
    recorder.close()
    last = run_dir.read_client_metrics()[-1]
    assert last["env-steps-unreported"] == 100 and last["rounds-unreported"] == 1


def _train_message():
    torch.manual_seed(0)
    return instruction(0, "train", RecordDict({
        "arrays": ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict()),
        "config": ConfigRecord({"local-steps": 100})}))


def test_a_device_with_unusable_state_replies_with_an_error_naming_itself_and_the_file(
        tmp_path):
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path)}
    context = device_context(0, run_config)
    assert not app(_train_message(), context).has_error()
    state = tmp_path / "devices" / "partition-0"
    buffer = state / "gen-000001" / "replay_buffer.npz"
    buffer.write_bytes(buffer.read_bytes()[:500])
    (state / "CURRENT").write_bytes(b"gen-0\x00garbage")
    reply = app(_train_message(), context)
    assert reply.has_error() and reply.error.code == DEVICE_STATE_ERROR_CODE
    assert "device partition-0" in reply.error.reason
    assert "replay_buffer.npz has 500 bytes" in reply.error.reason


@pytest.mark.slow
def test_a_run_whose_devices_fail_every_round_ends_failed(tmp_path):
    """Both devices' state is unusable (a pointer with nothing behind it): every train
    reply is an error, so the run must not exit 0, and it says why."""
    run_dir = tmp_path / "run"
    for partition in (0, 1):
        state = run_dir / "devices" / f"partition-{partition}"
        state.mkdir(parents=True)
        (state / "CURRENT").write_text("gen-000007")
    code = main(["--clients", "2", "--rounds", "2", "--run-dir", str(run_dir), "--quiet",
                 *[f"--set={k}={v}" for k, v in {**SMALL, "local-steps": 100,
                                                 "eval-episodes": 1}.items()]])
    assert code == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["failed_rounds"] == [1, 2]
    errors = [r for r in map(json.loads, (run_dir / "clients.jsonl").read_text().splitlines())
              if r["phase"] == "train"]
    assert len(errors) == 4
    assert {r["client"] for r in errors} == {"partition-0", "partition-1"}
    for row in errors:
        assert f"device {row['client']}" in row["error"]
        assert "CURRENT names gen-000007, which does not exist" in row["error"]
