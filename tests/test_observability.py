"""Per-client metrics, TensorBoard logs and per-client plots (server/observability.py,
server/plots.py): each reply becomes a clients.jsonl row, the event files hold global
and per-client scalars at the right env-step counts and are readable by TensorBoard's
format, a resumed run keeps a device's step count, and the per-client figure is drawn."""

import struct
from pathlib import Path

from _replies import error_reply, reply
from flwr.app import Message, MetricRecord, RecordDict
from tensorboardX.proto.event_pb2 import Event

from fedq.server.observability import RoundRecorder
from fedq.server.plots import client_series, plot_client_curves
from fedq.server.run_directory import RunDirectory


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag from TFRecord event files: u64 length, u32 crc, payload,
    u32 crc per record."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _train(node: int, partition: int, steps_total: int, ret: float) -> Message:
    metrics = MetricRecord({"partition-id": partition, "num-examples": 100,
                            "env-steps-total": steps_total, "episodes": 3, "updates": 10,
                            "mean-loss": 0.5, "mean-episode-return": ret})
    return reply(node, {"w": [0.0]}, metrics)


def _eval(node: int, partition: int, ret: float) -> Message:
    return reply(node, {"w": [0.0]}, MetricRecord({
        "partition-id": partition, "num-examples": 2, "eval-return-mean": ret,
        "personalized-return-mean": ret + 1}))


def _row(server_round: int, steps: float) -> dict:
    return {"round": server_round, "env-steps-per-client-total": steps,
            "train": {"mean-episode-return": 10.0, "clients": 1},
            "eval": {"eval-return-mean": 50.0 * server_round}}


def test_recorder_writes_client_rows_and_scalars_and_keeps_steps_over_resume(tmp_path):
    run_dir = RunDirectory(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    recorder = RoundRecorder(run_dir)
    recorder.record(_row(1, 100), [_train(11, 0, 100, 9.0), error_reply(12, "declined")],
                    [_eval(11, 0, 40.0), _eval(12, 1, 30.0)])
    recorder.close()
    rows = run_dir.read_client_metrics()
    assert [(r["phase"], r["client"]) for r in rows] == [
        ("train", "partition-0"), ("train", "node-12"), ("evaluate", "partition-0"),
        ("evaluate", "partition-1")]
    assert "declined" in rows[1]["error"]

    resumed = RoundRecorder(run_dir)  # a restarted server: steps come back from disk
    assert resumed.client_steps == {"partition-0": 100}
    resumed.record(_row(2, 200), [_train(13, 1, 100, 12.0)], [_eval(11, 0, 80.0)])
    resumed.close()
    scalars = read_scalars(run_dir.tensorboard_dir)
    assert scalars["global/eval-return-mean"] == [(100, 50.0), (200, 100.0)]
    assert scalars["client/partition-0/eval-return"] == [(100, 40.0), (100, 80.0)]
    assert scalars["client/partition-0/personalized-return"][0] == (100, 41.0)
    assert scalars["client/partition-1/eval-return"] == [(0, 30.0)]  # never trained yet
    assert scalars["client/partition-1/train-episode-return"] == [(100, 12.0)]


def test_client_series_places_evaluations_at_the_devices_own_steps_and_plots(tmp_path):
    rows = [
        {"round": 1, "phase": "train", "client": "partition-0", "env-steps-total": 500,
         "episodes": 4, "mean-episode-return": 20.0},
        {"round": 1, "phase": "train", "client": "partition-1", "env-steps-total": 500,
         "episodes": 0, "mean-episode-return": 0.0},  # no finished episode: no point
        {"round": 1, "phase": "evaluate", "client": "partition-0", "eval-return-mean": 30.0},
        {"round": 1, "phase": "evaluate", "client": "partition-2", "eval-return-mean": 9.0},
        {"round": 2, "phase": "train", "client": "partition-2", "error": "1: declined"},
    ]
    series = client_series(rows)
    assert series["partition-0"] == {"eval": [(500, 30.0)], "personalized": [],
                                     "train": [(500, 20.0)]}
    assert series["partition-1"]["train"] == []
    assert series["partition-2"]["eval"] == [(0.0, 9.0)]
    path = tmp_path / "clients.png"
    plot_client_curves([_row(1, 500)], rows, path, title="CartPole-v1")
    assert path.stat().st_size > 10_000


def test_reply_without_metrics_is_recorded_with_its_node(tmp_path):
    run_dir = RunDirectory(tmp_path)
    recorder = RoundRecorder(run_dir)
    bare = reply(5, {"w": [0.0]}, MetricRecord({"num-examples": 1}))
    bare.content = RecordDict({})
    recorder.record(_row(1, 10), [bare], [])
    recorder.close()
    assert run_dir.read_client_metrics()[0]["client"] == "node-5"


def test_learning_curve_marks_the_target_or_the_envs_solved_threshold():
    from fedq.server.plots import return_goal

    assert return_goal(float("inf"), "CartPole-v1") == (475.0, "solved (475, gymnasium's "
                                                               "threshold)")
    assert return_goal(300.0, "CartPole-v1") == (300.0, "target-return 300")
    assert return_goal(float("inf"), "Pendulum-v1") is None  # no threshold: no line
