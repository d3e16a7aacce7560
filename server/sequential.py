"""The ``sequential`` strategy: within a round the global model visits the devices one
after another, each training the previous device's result (cyclic weight transfer).

Why it exists: weights-only FedAvg of DQN learners averages N trajectories that each
took the same number of steps, so N devices move the model about as far per env step as
one device does (``simulations/bench_federation_levers.py`` measured many variants of
that). Visiting devices in sequence instead chains their updates: after a round of
``local-steps`` per device the model has trained on ``N x local-steps`` env steps of
experience, like one learner that had all of it, while raw transitions still never leave
their device. The price is wall time: one device trains at a time (the others wait), so a
round takes N times as long as a FedAvg round. Flower's own ``FedXgbCyclic`` is the
one-device-per-round form of the same idea; doing every device inside one round keeps the
round's meaning (each device runs ``local-steps``, then one federated evaluation) the same
as FedAvg's, so per-device steps and learning curves compare directly.

Pair it with ``exploration-clock = "federation"``: each visit is told (round config
``federation-env-steps``) how many env steps the model it carries has already learnt
from, so epsilon decays with the model's experience rather than restarting the schedule
on every device.

The visiting order is fixed: simulation partition id, then the device's key (a hash of
its node config, :mod:`common.device_key`: a real device has partition -1 and sorts by
it), then node id. The server learns each node's partition and key from its replies
and, for nodes it has not heard from yet, asks them with a ``query`` message before the
round, so the same seed gives the same run. With ``fraction-train`` < 1 a
round visits the next ``fraction x N`` devices of that order, continuing where the
previous round stopped.

Each visit's reply is screened against the model that visit was sent
(:func:`server.update_validation.screen_replies`): a broken or outlying update (its norm
compared with the median of the round's accepted visits so far, from the third on) is
skipped and the next device trains the model as it was. A device that fails or times out
(``round-timeout`` per visit) is skipped the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedq.common.config import FEDERATION_STEPS_KEY, FedqConfig
from fedq.common.device_key import DEVICE_KEY, NO_KEY
from fedq.server.metrics import aggregate_train_metrics
from fedq.server.outcome import sent_to
from fedq.server.update_validation import WEIGHT_KEY, Screening, screen_replies

NO_PARTITION = -1


def _identity_metric(msg: Message, name: str, missing: int) -> int:
    """An int identity metric (``Device.identity_metrics``) a reply carries, or
    ``missing`` for a failed or empty reply and a reply without it."""
    if msg.has_error() or not msg.has_content():
        return missing
    metrics = next(iter(msg.content.metric_records.values()), None)
    return missing if metrics is None else int(metrics.get(name, missing))


def reply_partition(msg: Message) -> int:
    """The simulation partition id a reply says it comes from (-1: none given)."""
    return _identity_metric(msg, "partition-id", NO_PARTITION)


def reply_device_key(msg: Message) -> int:
    """The device key a reply carries (:mod:`common.device_key`; 0: none given)."""
    return _identity_metric(msg, DEVICE_KEY, NO_KEY)


@dataclass
class DeviceOrder:
    """The order in which devices are visited, from the partition ids replies carry."""

    partitions: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    keys: dict[int, int] = field(default_factory=dict)  # node id -> device key

    def learn(self, replies: Iterable[Message]) -> None:
        """Remember the partition and device key of every node that answered."""
        for msg in replies:
            if not msg.has_error() and msg.has_content():
                self.partitions[msg.metadata.src_node_id] = reply_partition(msg)
                self.keys[msg.metadata.src_node_id] = reply_device_key(msg)

    def identify(self, grid: Grid, nodes: Iterable[int], timeout: float) -> None:
        """Ask the nodes not heard from yet who they are (a ``query`` message)."""
        unknown = [n for n in nodes if n not in self.partitions]
        if unknown:
            self.learn(grid.send_and_receive(
                [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                 for n in unknown], timeout=timeout))

    def key(self, node: int) -> tuple[bool, int, int, int]:
        """Sort key: nodes with a partition id first, by it, then the rest by device
        key; node id only breaks ties."""
        partition = self.partitions.get(node, NO_PARTITION)
        return (partition == NO_PARTITION, partition, self.keys.get(node, NO_KEY), node)

    def visits(self, grid: Grid, config: FedqConfig, server_round: int) -> list[int]:
        """This round's devices, in visiting order (waits for min-available-clients)."""
        while len(nodes := sorted(grid.get_node_ids())) < config.min_available_clients:
            time.sleep(1.0)
        self.identify(grid, nodes, config.round_timeout)
        ordered = sorted(nodes, key=self.key)
        count = max(int(len(ordered) * config.fraction_train), 1)
        start = (server_round - 1) * count % len(ordered)
        return [ordered[(start + i) % len(ordered)] for i in range(count)]


@dataclass
class TrainPhase:
    """What a round's training produced, whichever way the devices were asked."""

    sent: int
    replies: list[Message]  # every reply, in device order
    screening: Screening
    arrays: ArrayRecord | None  # the new global model; None: unchanged this round
    metrics: MetricRecord | None
    sent_to: dict[str, int] = field(default_factory=dict)  # message id -> node id
    # distributed DP: the noise multiplier of the released sum (fewer shares, less noise)
    noise_multiplier: float | None = None


def train_in_sequence(grid: Grid, config: FedqConfig, order: DeviceOrder,
                      arrays: ArrayRecord, train_config: ConfigRecord,
                      server_round: int) -> TrainPhase:
    """Send the model to each of the round's devices in turn, each visit starting from
    the previous accepted reply (see the module docstring)."""
    nodes = order.visits(grid, config, server_round)
    screening, replies, current = Screening(), [], arrays
    destinations: dict[str, int] = {}
    federation_steps = int(train_config[FEDERATION_STEPS_KEY])
    for node in nodes:
        visit_config = ConfigRecord({**dict(train_config), "server-round": server_round,
                                     FEDERATION_STEPS_KEY: federation_steps})
        message = Message(RecordDict({"arrays": current, "config": visit_config}),
                          message_type=MessageType.TRAIN, dst_node_id=node)
        answered = list(grid.send_and_receive([message], timeout=config.round_timeout))
        destinations.update(sent_to([message]))
        replies += answered
        accepted_before = len(screening.accepted)
        screen_replies(answered, current, config, server_round, screening)
        for reply in screening.accepted[accepted_before:]:
            current = reply.content["arrays"]
            federation_steps += int(next(iter(reply.content.metric_records.values()))
                                    [WEIGHT_KEY])
    order.learn(replies)
    valid = [msg.content for msg in screening.accepted]
    if len(valid) < config.min_train_replies:
        return TrainPhase(len(nodes), replies, screening, None, None, destinations)
    return TrainPhase(len(nodes), replies, screening, current,
                      aggregate_train_metrics(valid, WEIGHT_KEY), destinations)
