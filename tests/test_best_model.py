"""The run keeps the best global model by federated evaluation beside the latest, across
resumes and crashes, and ``fedq-export`` exports it unless told ``--latest``.

Why: DQN policies reach the goal and lose it later in the same run (issue 20), so the
newest checkpoint can be far worse than the best one. The round loop is the real one
(strategy, run directory, checkpoints) against an in-process federation whose devices
add 0.01 to every weight and report the greedy returns the test scripts."""

import json

import numpy as np
import pytest
import torch
from _replies import eval_reply, reply, train_metrics
from flwr.app import ArrayRecord

from fedq.common.config import FedqConfig
from fedq.common.export.checkpoint import CheckpointError, load_teacher
from fedq.common.export.cli import main as export_main
from fedq.server.best_model import BEST_FILE
from fedq.server.run_directory import RunDirectory
from fedq.server.server_app import build_strategy, initial_model, run_rounds

pytestmark = pytest.mark.usefixtures("server_process")  # tests/conftest.py


class _Federation:
    """One device; its evaluation of round k's global model returns ``returns[k-1]``."""

    def __init__(self, returns: list[float]) -> None:
        self.returns = list(returns)

    def get_node_ids(self):
        return [1]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == "train":
                weights = {k: a.numpy() + 0.01 for k, a in msg.content["arrays"].items()}
                replies.append(reply(1, weights, train_metrics(num_examples=100)))
            else:
                replies.append(eval_reply(1, self.returns.pop(0)))
        return replies


def _run(tmp_path, returns, rounds, resume=False):
    """Run (or resume) rounds up to ``rounds``; returns the run directory."""
    config = FedqConfig.from_mapping({"num-server-rounds": rounds, "hidden-sizes": "8",
                                      "env-id": "CartPole-v1", "run-dir": str(tmp_path),
                                      "resume": resume,
                                      # this fake federation answers evaluate messages;
                                      # fused rounds keep best.pt in tests/test_simulation.py
                                      "round-protocol": "train-then-evaluate"})
    run_dir = RunDirectory(tmp_path)
    last = run_dir.start(config)
    checkpoint = run_dir.load_checkpoint(last) if last else None
    run_rounds(_Federation(returns), build_strategy(config), config, run_dir,
               ArrayRecord(initial_model(config, checkpoint).state_dict()),
               first_round=last + 1)
    return run_dir


def _weights(payload):
    return {k: v.numpy().copy() for k, v in payload["state_dict"].items()}


def _best(run_dir):
    return torch.load(run_dir.checkpoints / BEST_FILE, weights_only=True)


def test_best_pt_holds_the_round_with_the_best_return_ties_to_the_later(tmp_path):
    run_dir = _run(tmp_path, [10.0, 50.0, 30.0, 50.0, 20.0], rounds=5)
    rows = run_dir.read_metrics()
    assert [r["best"]["round"] for r in rows] == [1, 2, 2, 4, 4]
    assert rows[-1]["best"] == {"round": 4, "eval-return-mean": 50.0}
    best = _best(run_dir)
    assert best["round"] == 4 and best["eval-return-mean"] == 50.0
    round_4 = _weights(run_dir.load_checkpoint(4))
    for key, value in _weights(best).items():
        np.testing.assert_array_equal(value, round_4[key])
    latest = _weights(run_dir.load_checkpoint(5))  # and it is not the latest model
    assert not all(np.array_equal(v, latest[k]) for k, v in _weights(best).items())


def test_best_model_survives_resume_and_later_worse_rounds(tmp_path):
    _run(tmp_path, [10.0, 50.0, 30.0], rounds=3)
    round_2 = _weights(torch.load(tmp_path / "checkpoints" / BEST_FILE, weights_only=True))
    run_dir = _run(tmp_path, [40.0, 45.0, 20.0], rounds=6, resume=True)
    assert [r["best"]["round"] for r in run_dir.read_metrics()] == [1, 2, 2, 2, 2, 2]
    assert not (tmp_path / "checkpoints" / "round-0002.pt").exists()  # pruned long ago
    best = _best(run_dir)
    assert best["round"] == 2
    for key, value in _weights(best).items():
        np.testing.assert_array_equal(value, round_2[key])


def test_a_crash_before_best_pt_landed_is_repaired_from_the_round_checkpoint(tmp_path):
    _run(tmp_path, [10.0, 50.0], rounds=2)
    # the crash: round 2's row and checkpoint are on disk, best.pt is still round 1's
    run_dir = RunDirectory(tmp_path)
    (run_dir.checkpoints / BEST_FILE).unlink()
    (run_dir.checkpoints / (BEST_FILE + ".sha256")).write_text("0 torn")
    run_dir = _run(tmp_path, [5.0], rounds=3, resume=True)
    assert [r["best"]["round"] for r in run_dir.read_metrics()] == [1, 2, 2]
    best = _best(run_dir)
    assert best["round"] == 2
    round_2 = _weights(run_dir.load_checkpoint(2))
    for key, value in _weights(best).items():
        np.testing.assert_array_equal(value, round_2[key])
    assert load_teacher(tmp_path).server_round == 2  # and its digest is whole again


def test_rounds_without_evaluation_leave_no_best_model(tmp_path):
    config = FedqConfig.from_mapping({"num-server-rounds": 1, "hidden-sizes": "8",
                                      "run-dir": str(tmp_path)})
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)

    class _NoEval(_Federation):
        def send_and_receive(self, messages, *, timeout=None):
            return [r for r in super().send_and_receive(messages)
                    if r.metadata.message_type == "train"]

    run_rounds(_NoEval([0.0]), build_strategy(config), config, run_dir,
               ArrayRecord(initial_model(config, None).state_dict()), first_round=1)
    assert run_dir.read_metrics()[0]["best"] is None
    assert not (run_dir.checkpoints / BEST_FILE).exists()
    assert load_teacher(tmp_path).server_round == 1  # export falls back to the newest


def test_fedq_export_takes_the_best_model_by_default_and_latest_on_request(tmp_path, capsys):
    _run(tmp_path, [10.0, 50.0, 30.0], rounds=3)
    assert load_teacher(tmp_path).server_round == 2
    assert load_teacher(tmp_path / "checkpoints").server_round == 2
    assert load_teacher(tmp_path, latest=True).server_round == 3
    out = tmp_path / "export"
    assert export_main([str(tmp_path), "--out", str(out), "--formats", "fp32"]) == 0
    assert json.loads((out / "manifest.json").read_text())["round"] == 2
    assert export_main([str(tmp_path), "--latest", "--out", str(out),
                        "--formats", "fp32"]) == 0
    assert json.loads((out / "manifest.json").read_text())["round"] == 3


def test_a_best_pt_that_does_not_match_its_digest_is_refused_naming_latest(tmp_path):
    _run(tmp_path, [10.0, 50.0], rounds=2)
    best = tmp_path / "checkpoints" / BEST_FILE
    best.write_bytes(best.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"does not match best\.pt\.sha256; pass --latest"):
        load_teacher(tmp_path)
    assert load_teacher(tmp_path, latest=True).server_round == 2
