"""A round goes on with the devices that answered: ``run_rounds`` records how many were
sampled, replied, failed or stayed silent, aggregates the replies it has, and keeps the
global model when fewer than ``min-train-replies`` valid updates arrived.

The federation is an in-process stand-in for the SuperLink (the real one is exercised in
tests/test_deployment.py, where a SuperNode is killed mid-round); the strategy, update
screening, run directory and checkpoints are the real ones."""

import numpy as np
import pytest
from _replies import error_reply, eval_reply, reply, train_metrics
from _round_loop import run_in_process


class _Federation:
    """Nodes 1-3: ``silent`` ones never answer (a device that lost power), ``failing``
    ones answer training with an error; the rest train (+0.01 on every weight)."""

    def __init__(self, silent=(), failing=()) -> None:
        self.silent, self.failing = set(silent), set(failing)

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if msg.metadata.message_type == "train":
                weights = {k: a.numpy() + 0.01 for k, a in msg.content["arrays"].items()}
                replies.append(error_reply(node) if node in self.failing
                               else reply(node, weights, train_metrics(num_examples=100)))
            else:
                replies.append(eval_reply(node))
        return replies


pytestmark = pytest.mark.usefixtures("server_process")  # tests/conftest.py


def _run(tmp_path, federation, **config):
    (row,), initial, final = run_in_process(tmp_path, federation, **config)
    return row, initial, final


def test_round_aggregates_the_devices_that_answered_and_records_who_did(tmp_path):
    row, initial, final = _run(tmp_path, _Federation(silent=[3], failing=[2]))
    assert row["participation"]["train"] == {"sampled": 3, "replied": 1, "errors": 1,
                                             "missing": 1}
    assert row["participation"]["evaluate"] == {"sampled": 3, "replied": 2, "errors": 0,
                                                "missing": 1}
    assert row["train"]["clients"] == 1
    for key in initial:  # the one update that arrived became the global model
        np.testing.assert_allclose(final[key], initial[key] + 0.01, rtol=0, atol=1e-6)


def test_too_few_valid_updates_keep_the_global_model(tmp_path):
    row, initial, final = _run(tmp_path, _Federation(silent=[3], failing=[2]),
                               **{"min-train-replies": 2})
    assert row["participation"]["train"]["replied"] == 1
    assert row["train"]["clients"] == 0
    for key in initial:
        np.testing.assert_array_equal(final[key], initial[key])
