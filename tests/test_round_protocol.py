"""The fused round protocol (server/round_protocol.py): one message per device and round,
the train message of round r+1 evaluating round r's model first.

Protects that it changes nothing but the number of messages: the same seed gives the same
metrics rows (train and eval metrics, participation, failures), the same clients.jsonl
rows and the same global models as ``train-then-evaluate``, in Flower's simulation engine
(the product's ServerApp and ClientApp); the last round's model is evaluated by a message
of its own; a resumed fused run produces each round once; devices whose fused reply is
an error still get evaluated; strategies that need two messages keep them.
"""

import json

import numpy as np
import pytest
import torch
from _replies import device_context, error_reply, eval_reply, instruction, reply, train_metrics
from _round_loop import run_in_process
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedq.client.client_app import app
from fedq.common.config import EVALUATE_ROUND_KEY, EVALUATION_RECORD, FedqConfig
from fedq.common.networks import QNetwork
from fedq.server.round_protocol import split_reply, uses_fused_rounds
from fedq.server.run_directory import RunDirectory
from fedq.simulations.run import simulate

TINY = {"local-steps": 300, "learning-starts": 100, "batch-size": 32, "buffer-size": 2000,
        "hidden-sizes": "16,16", "eval-episodes": 2, "exploration-steps": 600, "seed": 3,
        "backend": "numpy"}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(value):
    """``value`` without its wall-clock timings (keys naming seconds), at any depth."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _renamed(run_dir, rows):
    """``rows`` with each node id (random per run) replaced by the device's partition."""
    text = json.dumps(rows)
    for client in _rows(run_dir / "clients.jsonl"):
        text = text.replace(str(client["node-id"]), f"{90_000 + client['partition-id']}")
    return json.loads(text)


def _simulate(run_dir, protocol, rounds=3, **extra):
    result = simulate({**TINY, "num-server-rounds": rounds, "round-protocol": protocol,
                       "run-dir": str(run_dir), **extra}, clients=2, stream=False)
    assert result.returncode == 0, (run_dir / "flower.log").read_text()[-3000:]
    return _rows(run_dir / "metrics.jsonl")


@pytest.mark.slow
def test_fused_rounds_give_the_same_run_as_train_then_evaluate_resumed_or_not(tmp_path):
    """Fused: 2 rounds, then resumed to 3 (each round once); train-then-evaluate: 3 rounds
    in one go. Same seed: the same rows, client rows and global models."""
    fused, two = tmp_path / "fused", tmp_path / "two"
    _simulate(fused, "fused", rounds=2)
    rows = _simulate(fused, "fused", rounds=3, resume=True)
    reference = _simulate(two, "train-then-evaluate")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # every round evaluated by every device, the last one's model too (its own message)
    assert all(r["eval"]["clients"] == 2 and r["train"]["clients"] == 2 for r in rows)
    assert [(r["round"], r["phase"]) for r in _rows(fused / "clients.jsonl")] == \
        [(n, phase) for n in (1, 2, 3) for phase in ("train",) * 2 + ("evaluate",) * 2]
    assert _renamed(fused, _untimed(rows)) == _renamed(two, _untimed(reference))
    clients = [_renamed(d, _untimed(_rows(d / "clients.jsonl"))) for d in (fused, two)]
    assert clients[0] == clients[1]
    for n in (1, 2, 3):
        models = [RunDirectory(d).load_checkpoint(n)["state_dict"] for d in (fused, two)]
        for key, tensor in models[0].items():
            np.testing.assert_array_equal(tensor.numpy(), models[1][key].numpy())


class _FusedFederation:
    """Nodes 1-3 as fedq devices answer a fused train message (node 2 declines to train,
    an error reply without its evaluation); records each batch of messages sent as
    (kind, evaluate-round, nodes) (Flower samples a phase's nodes in random order)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int | None, list[int]]] = []

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        messages = list(messages)
        first = messages[0]
        self.batches.append((first.metadata.message_type,
                             first.content["config"].get(EVALUATE_ROUND_KEY),
                             sorted(m.metadata.dst_node_id for m in messages)))
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            evaluate_round = msg.content["config"].get(EVALUATE_ROUND_KEY)
            # ids as a SuperLink gives them: the server tells replies apart by them
            message_id = msg.metadata.__dict__["_message_id"] = f"{len(self.batches)}-{node}"
            if kind != "train":
                answer = eval_reply(node, mean_return=float(node))
            elif node == 2:
                answer = error_reply(node)
            else:
                weights = {k: a.numpy() + 0.01 for k, a in msg.content["arrays"].items()}
                answer = reply(node, weights, train_metrics(num_examples=100))
                if evaluate_round is not None:
                    answer.content[EVALUATION_RECORD] = \
                        eval_reply(node, mean_return=float(node)).content["metrics"]
            answer.metadata.__dict__["_reply_to_message_id"] = message_id
            replies.append(answer)
        return replies


@pytest.mark.usefixtures("server_process")
def test_fused_rounds_send_one_message_and_evaluate_declining_devices_apart(tmp_path):
    federation = _FusedFederation()
    rows, initial, final = run_in_process(tmp_path, federation, rounds=3)
    # round 1 trains only; rounds 2-3 train and evaluate the previous model; node 2's
    # error reply carries no evaluation, so it is sent round r's evaluate message
    # after round r+1's train phase; the last model gets evaluate messages of its own
    assert federation.batches == [
        ("train", None, [1, 2, 3]),
        ("train", 1, [1, 2, 3]), ("evaluate", None, [2]),
        ("train", 2, [1, 2, 3]), ("evaluate", None, [2]),
        ("evaluate", None, [1, 2, 3])]
    for row in rows:
        assert row["eval"]["clients"] == 3 and row["eval"]["eval-return-mean"] == 2.0
        assert row["participation"]["evaluate"] == {"sampled": 3, "replied": 3,
                                                    "errors": 0, "missing": 0}
        assert row["train"]["clients"] == 2
    for key in initial:  # three rounds of +0.01: each round's update kept once
        np.testing.assert_allclose(final[key], initial[key] + 0.03, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("server_process")
def test_train_then_evaluate_sends_two_messages_per_round(tmp_path):
    federation = _FusedFederation()
    run_in_process(tmp_path, federation, rounds=2, **{"round-protocol": "train-then-evaluate"})
    assert federation.batches == [(kind, None, [1, 2, 3]) for _ in range(2)
                                         for kind in ("train", "evaluate")]


def test_split_reply_gives_the_train_and_evaluate_replies():
    fused = reply(1, {"w": np.zeros(2, np.float32)})
    fused.content[EVALUATION_RECORD] = eval_reply(1, 7.0).content["metrics"]
    train, evaluation = split_reply(fused)
    assert list(train.content) == ["arrays", "metrics"]
    assert evaluation.metadata.message_type == "evaluate"
    assert evaluation.metadata.src_node_id == 1
    assert dict(evaluation.content["metrics"])["eval-return-mean"] == 7.0
    declined = error_reply(1)
    assert split_reply(declined) == (declined, None)


@pytest.mark.parametrize(("overrides", "fused"), [
    ({}, True),
    ({"round-protocol": "train-then-evaluate"}, False),
    ({"strategy": "sequential"}, False),
    ({"fraction-train": 0.5}, False),
    ({"fraction-evaluate": 0.5}, False),
    ({"strategy": "fedadam"}, True),
])
def test_the_registry_and_sampling_decide_when_rounds_can_be_fused(overrides, fused):
    assert uses_fused_rounds(FedqConfig.from_mapping(overrides)) is fused


def test_resume_refuses_a_changed_round_protocol(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.start(FedqConfig.from_mapping({"run-dir": str(tmp_path)}))
    changed = FedqConfig.from_mapping({"run-dir": str(tmp_path), "resume": True,
                                       "round-protocol": "train-then-evaluate"})
    with pytest.raises(Exception, match="round-protocol"):
        run_dir.start(changed)


def test_an_unknown_round_protocol_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="round-protocol"):
        FedqConfig.from_mapping({"round-protocol": "fast"})


@pytest.mark.parametrize("node", [
    {"privacy-release-metrics": "minimal"},  # a DP device that releases the minimum
    {"dp-enabled": False},  # a device without DP: releases everything
])
def test_a_fused_train_message_evaluates_as_the_evaluate_message_does(tmp_path, node):
    """The evaluation in a fused reply is the evaluate reply the device would have sent for
    the same model and round: the same episodes and the same privacy-policy release."""
    run_config = {**FedqConfig().to_mapping(), **TINY, "dp-enabled": True,
                  "run-dir": str(tmp_path)}
    context = device_context(0, run_config, **node)
    torch.manual_seed(0)
    weights = ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())
    train = {"arrays": weights, "config": ConfigRecord({"local-steps": 300})}
    app(instruction(0, "train", RecordDict(train)), context)  # round 1: a buffer, a ledger
    evaluate = app(instruction(0, "evaluate", RecordDict(
        {"arrays": weights, "config": ConfigRecord({"server-round": 1})})), context)
    fused = app(instruction(0, "train", RecordDict({**train, "config": ConfigRecord(
        {"local-steps": 300, EVALUATE_ROUND_KEY: 1})})), context)
    assert not fused.has_error()
    assert json.dumps(dict(fused.content[EVALUATION_RECORD])) == \
        json.dumps(dict(evaluate.content["metrics"]))
    assert set(fused.content) == {"arrays", "metrics", EVALUATION_RECORD}
