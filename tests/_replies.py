"""Train replies built in-process, as the server receives them from devices: what the
strategy and update-validation tests feed to ``aggregate_train`` / ``screen_replies``."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict


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


def error_reply(node: int, reason: str = "declined") -> Message:
    return Message(Error(code=1, reason=reason), metadata=_metadata(node))


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}
