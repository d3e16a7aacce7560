"""Deployed runs aggregate in an order that does not depend on node ids.

A deployed device has no partition id and the SuperLink draws its node id at random on
every SuperNode start. Aggregation sums float32 updates reply by reply, so an order taken
from node ids made two deployed runs with the same seed differ in the global model's last
bits (and DQN turns those into different runs). Replies carry a hash of the device's node
config (``device-key``, common/device_key.py); these tests protect that the same replies
give bit-identical aggregates whatever node ids and arrival order a run drew, for every
strategy that sums replies, and that the sequential strategy visits devices in the same
order too.
"""

import itertools
import random

import numpy as np
import pytest
from _replies import as_numpy, reply, train_metrics
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedq.client.device import device_from_context
from fedq.common.config import FedqConfig
from fedq.common.device_key import DEVICE_KEY, device_key
from fedq.server.sequential import DeviceOrder
from fedq.server.server_app import in_device_order
from fedq.server.strategies import choose_strategy

# Three deployed devices as docker-compose.yml configures them, by node config.
NODE_CONFIGS = [
    {"env-id": "CartPole-v1", "seed": 1, "state-dir": "/data/devices/node-1"},
    {"env-id": "CartPole-v1", "seed": 2, "state-dir": "/data/devices/node-2",
     "env-physics": '{"length": 0.3}'},
    {"env-id": "CartPole-v1", "seed": 3, "state-dir": "/data/devices/node-3",
     "env-physics": '{"length": 0.8, "masspole": 0.2}'},
    {"env-id": "CartPole-v1", "seed": 4, "state-dir": "/data/devices/node-4"},
]
# float32 values whose sum depends on the order they are added in
VALUES = [1e8, 1.0, -1e8, 3.0]
GLOBAL = {"w": np.zeros(3, np.float32)}


def _replies(node_ids: list[int]) -> list:
    """Device i's reply, sent from node ``node_ids[i]`` (partition -1: deployed)."""
    return [reply(node, {"w": np.full(3, value, np.float32)},
                  MetricRecord({**train_metrics(100 + 7 * i), "partition-id": -1,
                                DEVICE_KEY: device_key(config)}))
            for i, (node, value, config) in enumerate(zip(node_ids, VALUES, NODE_CONFIGS,
                                                          strict=True))]


class _Nodes:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def _runs(count: int = 6) -> list[list]:
    """The same four replies as ``count`` runs would receive them: fresh random node ids
    each run, and a different arrival order."""
    rng = random.Random(0)
    runs = []
    for order in itertools.islice(itertools.permutations(range(4)), count):
        replies = _replies([rng.randrange(1, 2**63) for _ in NODE_CONFIGS])
        runs.append([replies[i] for i in order])
    return runs


def _aggregate(config: dict, replies: list, node_ids: list[int]) -> bytes:
    strategy = choose_strategy(FedqConfig.from_mapping(config))
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                  ConfigRecord({"local-steps": 10}), _Nodes(node_ids)))
    arrays, _ = strategy.aggregate_train(1, replies)
    return as_numpy(arrays)["w"].tobytes()


@pytest.mark.parametrize("config", [
    {}, {"strategy": "fedprox", "proximal-mu": 0.1},
    {"strategy": "fedavgm", "server-momentum": 0.5}, {"strategy": "fedadam"},
    {"strategy": "fedyogi"}, {"strategy": "fedtrimmedavg", "trim-beta": 0.25},
], ids=lambda c: c.get("strategy", "fedavg"))
@pytest.mark.usefixtures("server_process")
def test_same_replies_give_bit_identical_aggregates_whatever_node_ids_were_drawn(config):
    results = set()
    for replies in _runs():
        nodes = [m.metadata.src_node_id for m in replies]
        results.add(_aggregate(config, in_device_order(replies), nodes))
    assert len(results) == 1


@pytest.mark.usefixtures("server_process")
def test_the_order_matters_without_device_keys():
    # the premise: by node id (the order before device keys), the runs differ
    def by_node(replies):
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

    results = {_aggregate({}, by_node(replies), [m.metadata.src_node_id for m in replies])
               for replies in _runs()}
    assert len(results) > 1


def test_sequential_visits_devices_in_node_config_order_whatever_their_node_ids():
    orders = set()
    for replies in _runs():
        order = DeviceOrder()
        order.learn(replies)
        by_node = {m.metadata.src_node_id: i for i, m in enumerate(replies)}
        keys = {m.metadata.src_node_id: m.content["metrics"][DEVICE_KEY] for m in replies}
        visited = sorted(by_node, key=order.key)
        orders.add(tuple(keys[n] for n in visited))
    assert len(orders) == 1


def test_device_key_is_the_node_configs_not_the_node_ids():
    config = NODE_CONFIGS[1]
    reordered = dict(reversed(list(config.items())))
    assert device_key(config) == device_key(reordered)
    moved = {**config, "state-dir": "/srv/fedq/node-2", "message-audit-dir": "/tmp/audit"}
    assert device_key(moved) == device_key(config)  # where it keeps state, not who it is
    assert len({device_key(c) for c in NODE_CONFIGS}) == len(NODE_CONFIGS)
    assert 0 <= device_key(config) < 2**62

    def key_on_node(node_id: int) -> int:
        context = Context(run_id=1, node_id=node_id, node_config=dict(config), state=RecordDict(),
                          run_config={})
        return device_from_context(context).identity_metrics()[DEVICE_KEY]

    assert key_on_node(17) == key_on_node(2**40 + 3) == device_key(config)
