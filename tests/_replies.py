"""Messages built in-process: train replies as the server receives them from devices
(what the strategy and update-validation tests feed to ``aggregate_train`` /
``screen_replies``), and instructions with a device context as a ClientApp receives them."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)


def train_metrics(num_examples: float = 100) -> MetricRecord:
    """Every metric a fedq device reports (server.metrics aggregates these keys)."""
    return MetricRecord({"num-examples": num_examples, "episodes": 2, "updates": 10,
                         "mean-loss": 0.5, "mean-episode-return": 20.0, "epsilon": 0.1,
                         "train-seconds": 1.0, "handler-seconds": 1.2})


def _metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"i{node}", group_id="", created_at=0.0, ttl=600.0,
                    message_type="train")


def reply(node: int, arrays: dict[str, np.ndarray] | ArrayRecord,
          metrics: MetricRecord | None = None) -> Message:
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": metrics or train_metrics()})
    return Message(content, metadata=_metadata(node))


def eval_reply(node: int, mean_return: float = 10.0) -> Message:
    """A device's evaluate reply: one greedy episode of ``mean_return``."""
    metrics = MetricRecord({"num-examples": 1, "eval-return-mean": mean_return,
                            "eval-return-min": mean_return, "eval-return-max": mean_return})
    return Message(RecordDict({"metrics": metrics}), metadata=Metadata(
        run_id=1, message_id=f"e{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id="", group_id="", created_at=0.0, ttl=600.0,
        message_type="evaluate"))


def error_reply(node: int, reason: str = "declined") -> Message:
    return Message(Error(code=1, reason=reason), metadata=_metadata(node))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}


def device_context(partition: int, run_config: dict, **node: object) -> Context:
    """The context a simulated device (``partition``) hands its ClientApp."""
    return Context(run_id=1, node_id=100 + partition, state=RecordDict(), run_config=run_config,
                   node_config={"partition-id": partition, "num-partitions": 2, **node})


def instruction(partition: int, kind: str, content: RecordDict) -> Message:
    """A ``kind`` ("train", "evaluate", "query") message from the server to ``partition``."""
    return Message(content, metadata=Metadata(
        run_id=1, message_id=f"{kind}-{partition}", src_node_id=1, dst_node_id=100 + partition,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=kind))
