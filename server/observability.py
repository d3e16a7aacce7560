"""Per-device metrics and TensorBoard logs of a run, written round by round.

``metrics.jsonl`` holds one aggregated row per round: enough to see the federation, not
to see that the short-pole device is the one failing. :class:`RoundRecorder` also keeps
every device reply's scalars in ``clients.jsonl`` (round, phase, partition id, node id)
and writes global and per-client scalars to ``<run-dir>/tensorboard`` with tensorboardX,
whose event files any TensorBoard reads (``tensorboard --logdir <run-dir>/tensorboard``).
tensorboardX and not ``torch.utils.tensorboard``: torch's writer imports the whole
``tensorboard`` server package (its web server, data server binary and five more
dependencies) just to write these files; tensorboardX needs only protobuf, which Flower
already brings.

X axes are env steps per client: the global curves use the round's
``env-steps-per-client-total``, a device's curves its own ``env-steps-total``, so a
device that is sampled less often shows up as a shorter curve, not a slower one.

A device's train row also says how much of its work the server never received:
``env-steps-unreported`` is the growth of its lifetime env steps since its previous
reply beyond this round's steps (a round it trained in but whose reply was lost, e.g.
after ``round-timeout``), ``rounds-unreported`` the same for its rounds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message
from tensorboardX import SummaryWriter

from fedq.server.outcome import replying_node
from fedq.server.run_directory import RunDirectory

_GLOBAL_SCALARS = {
    ("eval", "eval-return-mean"): "global/eval-return-mean",
    ("eval", "eval-return-worst-client"): "global/eval-return-worst-client",
    ("eval", "eval-return-best-client"): "global/eval-return-best-client",
    ("eval", "personalized-return-mean"): "global/personalized-return-mean",
    ("eval", "personalized-return-worst-client"): "global/personalized-return-worst-client",
    ("train", "mean-episode-return"): "global/train-episode-return",
    ("train", "mean-loss"): "global/train-loss",
    ("train", "epsilon"): "global/epsilon",
    ("train", "clients"): "global/train-clients",
}
_CLIENT_SCALARS = {
    "train": {"mean-episode-return": "train-episode-return", "mean-loss": "train-loss"},
    "evaluate": {"eval-return-mean": "eval-return",
                 "personalized-return-mean": "personalized-return"},
}

_NEEDS = {"mean-episode-return": "episodes", "mean-loss": "updates"}


def client_label(row: dict[str, Any]) -> str:
    """``partition-K`` in simulation, ``node-ID`` for a real device."""
    partition = row.get("partition-id", -1)
    return f"partition-{partition}" if partition >= 0 else f"node-{row['node-id']}"


def client_rows(server_round: int, phase: str, replies: Iterable[Message],
                destinations: Mapping[str, int] | None = None,
                partitions: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One row per reply: its scalar metrics (list-valued ones left out), or its error.

    The node id is the device's own, also for the errors the SuperLink sends on a
    device's behalf (``destinations``: message id -> node id of what was sent); an error
    row carries the partition the device has replied with before (``partitions``)."""
    rows = []
    for msg in replies:
        node = replying_node(msg, destinations or {})
        row: dict[str, Any] = {"round": server_round, "phase": phase, "node-id": node}
        if msg.has_error():
            row["error"] = f"{msg.error.code}: {msg.error.reason}"
            row["partition-id"] = (partitions or {}).get(node, -1)
        elif msg.has_content() and msg.content.metric_records:
            metrics = next(iter(msg.content.metric_records.values()))
            row.update({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        row["client"] = client_label(row)
        rows.append(row)
    return rows


class RoundRecorder:
    """Appends per-client rows and TensorBoard scalars after every round."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        # the suffix keeps a resumed server (same second, same host) from truncating the
        # event file of the run it resumes
        self.writer = SummaryWriter(logdir=str(run_dir.tensorboard_dir), flush_secs=3600,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        # each device's lifetime env steps and rounds as of its last train reply
        # (resume: from disk)
        self.client_steps: dict[str, float] = {}
        self.client_rounds: dict[str, int] = {}
        for row in run_dir.read_client_metrics():
            if row["phase"] == "train" and "env-steps-total" in row:
                self.client_steps[row["client"]] = row["env-steps-total"]
            if row["phase"] == "train" and "rounds-total" in row:
                self.client_rounds[row["client"]] = row["rounds-total"]

    def record(self, row: dict[str, Any], train_replies: Iterable[Message],
               eval_replies: Iterable[Message], destinations: Mapping[str, int] | None = None,
               partitions: Mapping[int, int] | None = None) -> None:
        """Write the round's per-client rows, then its scalars; call before the round's
        ``metrics.jsonl`` row is appended (``destinations``, ``partitions``: see
        :func:`client_rows`)."""
        rows = (client_rows(row["round"], "train", train_replies, destinations, partitions)
                + client_rows(row["round"], "evaluate", eval_replies, destinations,
                              partitions))
        for client in rows:
            self._unreported_work(client)
        self.run_dir.append_client_metrics(rows)
        step = int(row["env-steps-per-client-total"])
        for (section, key), tag in _GLOBAL_SCALARS.items():
            value = row.get(section, {}).get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for client in rows:
            if client["phase"] == "train" and "env-steps-total" in client:
                self.client_steps[client["client"]] = client["env-steps-total"]
            client_step = int(self.client_steps.get(client["client"], 0))
            for key, name in _CLIENT_SCALARS[client["phase"]].items():
                value = client.get(key)
                if key in _NEEDS and not client.get(_NEEDS[key]):
                    continue  # no episode ended / no update made: 0.0 is no measurement
                if isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"client/{client['client']}/{name}", value,
                                           client_step)
        self.writer.flush()  # a crash loses no finished round

    def _unreported_work(self, client: dict[str, Any]) -> None:
        """Add ``env-steps-unreported`` / ``rounds-unreported`` to a train row (see the
        module docstring); updates the per-device rounds seen."""
        if client["phase"] != "train":
            return
        name = client["client"]
        if name in self.client_steps and {"env-steps-total", "num-examples"} <= set(client):
            client["env-steps-unreported"] = (client["env-steps-total"] - client["num-examples"]
                                              - self.client_steps[name])
        if "rounds-total" in client:
            if name in self.client_rounds:
                client["rounds-unreported"] = (client["rounds-total"] - 1
                                               - self.client_rounds[name])
            self.client_rounds[name] = client["rounds-total"]

    def close(self) -> None:
        self.writer.close()
