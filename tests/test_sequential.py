"""The ``sequential`` strategy chains the devices' training inside a round: each device
starts from the previous device's accepted reply, devices are visited in partition order
(not node-id or arrival order), each visit is told how many env steps the model it
carries has learnt from, and a failed or rejected visit is skipped without losing the
chain. With ``fraction-train`` < 1 rounds take turns over the devices.

The federation is an in-process stand-in for the SuperLink, as in
tests/test_round_participation.py; the strategy code, screening, run directory and
checkpoints are the real ones (tests/test_deployment.py runs it end to end with real
SuperNodes; tests/test_exploration_clock.py has the ClientApp's query answer and its
epsilon from the federation's step count)."""

import numpy as np
import pytest
from _replies import error_reply, reply, train_metrics
from _round_loop import run_in_process
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedq.common.config import FEDERATION_STEPS_KEY, FedqConfig
from fedq.server.run_directory import RunDirectory
from fedq.server.server_app import build_strategy, run_rounds

# node id -> partition id: node ids deliberately out of partition order
PARTITIONS = {30: 0, 10: 1, 20: 2}
STEPS = 100


def _reply_metadata(node, kind):
    return Metadata(run_id=1, message_id=f"{kind}{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
                    message_type=kind)


class _Federation:
    """Each node trains by adding (partition + 1) to every weight, and records what it
    was sent; ``failing`` nodes answer training with an error, ``nan`` nodes send NaN."""

    def __init__(self, failing=(), nan=()) -> None:
        self.failing, self.nan = set(failing), set(nan)
        self.visits: list[tuple[int, dict, float]] = []  # (partition, weights, fed. steps)
        self.queried: list[int] = []

    def get_node_ids(self):
        return list(PARTITIONS)

    def send_and_receive(self, messages, *, timeout=None):
        return [self._answer(msg) for msg in messages]

    def _answer(self, msg):
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        partition = PARTITIONS[node]
        if kind == "query":
            self.queried.append(node)
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}),
                           metadata=_reply_metadata(node, "query"))
        if kind == "evaluate":
            metrics = MetricRecord({"num-examples": 1, "eval-return-mean": 10.0,
                                    "eval-return-min": 10.0, "eval-return-max": 10.0,
                                    "partition-id": partition})
            return Message(RecordDict({"metrics": metrics}),
                           metadata=_reply_metadata(node, "evaluate"))
        sent = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        self.visits.append((partition, sent, msg.content["config"][FEDERATION_STEPS_KEY]))
        if node in self.failing:
            return error_reply(node)
        trained = {k: v + (np.nan if node in self.nan else partition + 1.0)
                   for k, v in sent.items()}
        metrics = train_metrics(num_examples=STEPS)
        metrics["partition-id"] = partition
        return reply(node, trained, metrics)


pytestmark = pytest.mark.usefixtures("server_process")  # tests/conftest.py


def _run(tmp_path, federation, rounds=1, **config):
    return run_in_process(tmp_path, federation, rounds, strategy="sequential", **config)


def test_each_device_trains_the_previous_devices_result_in_partition_order(tmp_path):
    federation = _Federation()
    rows, initial, final = _run(tmp_path, federation, rounds=2)
    assert [p for p, _, _ in federation.visits] == [0, 1, 2, 0, 1, 2]
    added = 0.0
    for partition, sent, _ in federation.visits:  # visit k got visit k-1's weights
        for key in initial:
            np.testing.assert_allclose(sent[key], initial[key] + added, atol=1e-5)
        added += partition + 1.0
    for key in initial:  # every visit's training is in the final model: 2 x (1 + 2 + 3)
        np.testing.assert_allclose(final[key], initial[key] + 12.0, atol=1e-5)
    # each visit knows how many env steps the model it carries has learnt from
    assert [steps for _, _, steps in federation.visits] == [0, 100, 200, 300, 400, 500]
    assert [r["env-steps-federation-total"] for r in rows] == [300, 600]
    assert [r["env-steps-per-client-total"] for r in rows] == [100, 200]
    assert all(r["train"]["clients"] == 3 for r in rows)
    assert sorted(federation.queried) == sorted(PARTITIONS)  # asked once, then known


def test_a_failed_or_rejected_visit_is_skipped_and_the_chain_goes_on(tmp_path):
    federation = _Federation(failing=[10], nan=[20])  # partitions 1 and 2
    (row,), initial, final = _run(tmp_path, federation)
    after_first = {k: v + 1.0 for k, v in initial.items()}  # partition 0's update
    for _, sent, _ in federation.visits[1:]:
        for key in initial:
            np.testing.assert_allclose(sent[key], after_first[key], atol=1e-5)
    for key in initial:
        np.testing.assert_allclose(final[key], after_first[key], atol=1e-5)
    assert row["participation"]["train"] == {"sampled": 3, "replied": 2, "errors": 1,
                                             "missing": 0}
    assert row["updates"]["rejected-nodes"] == [20]
    assert "NaN" in row["updates"]["rejected-reasons"]["20"]
    assert row["train"]["clients"] == 1 and row["env-steps-federation-total"] == STEPS


def test_too_few_valid_visits_keep_the_round_start_model(tmp_path):
    federation = _Federation(failing=[10, 20])
    (row,), initial, final = _run(tmp_path, federation, **{"min-train-replies": 2})
    assert row["train"]["clients"] == 0 and row["env-steps-federation-total"] == 0
    for key in initial:
        np.testing.assert_array_equal(final[key], initial[key])


def test_a_fraction_of_devices_per_round_takes_turns_in_partition_order(tmp_path):
    federation = _Federation()
    _run(tmp_path, federation, rounds=4, **{"fraction-train": 0.34})  # 1 of 3 per round
    assert [p for p, _, _ in federation.visits] == [0, 1, 2, 0]


def test_an_outlying_update_is_compared_with_the_rounds_earlier_visits(tmp_path):
    """The norm check needs >= 3 updates; in a chain they are the round's visits so far."""
    class _Outlier(_Federation):
        def _answer(self, msg):
            answer = super()._answer(msg)
            if msg.metadata.message_type == "train" and PARTITIONS[
                    msg.metadata.dst_node_id] == 2:
                weights = {k: a.numpy() * 0 + 1e6 for k, a in answer.content["arrays"].items()}
                metrics = train_metrics(num_examples=STEPS)
                metrics["partition-id"] = 2
                return reply(msg.metadata.dst_node_id, weights, metrics)
            return answer
    (row,), _, _ = _run(tmp_path, _Outlier())
    assert row["updates"]["rejected-nodes"] == [20]
    assert "median update norm" in row["updates"]["rejected-reasons"]["20"]


def test_a_resumed_server_continues_the_federation_count_and_the_rotation(tmp_path):
    """The count is recomputed from metrics.jsonl, the turn from the round number."""
    _run(tmp_path, _Federation(), rounds=1, **{"fraction-train": 0.34})
    config = FedqConfig.from_mapping({"num-server-rounds": 2, "hidden-sizes": "8",
                                      "strategy": "sequential", "run-dir": str(tmp_path),
                                      "fraction-train": 0.34, "resume": True})
    run_dir = RunDirectory(tmp_path)
    assert run_dir.start(config) == 1
    resumed = _Federation()  # a new server process: it knows no node yet
    run_rounds(resumed, build_strategy(config), config, run_dir,
               ArrayRecord(run_dir.load_checkpoint(1)["state_dict"]), first_round=2)
    assert [(p, steps) for p, _, steps in resumed.visits] == [(1, STEPS)]
    assert [r["env-steps-federation-total"] for r in run_dir.read_metrics()] == [100, 200]


def test_steps_per_client_count_every_device_of_the_federation(tmp_path):
    """One device of three trains per round: after three rounds each has run 100 steps."""
    rows, _, _ = _run(tmp_path, _Federation(), rounds=3, **{"fraction-train": 0.34})
    assert [r["env-steps-per-client-total"] for r in rows] == pytest.approx(
        [100 / 3, 200 / 3, 100])
    assert [r["env-steps-federation-total"] for r in rows] == [100, 200, 300]
