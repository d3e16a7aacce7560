"""A strategy is one registration (common/strategy_registry.py): a strategy registered
here, in a test, is accepted by config validation (a name not registered is refused
naming the field), is built by the server and runs a round of the real round loop; the
docs table and the central-DP rule derive from the registry; a registration with an
unknown train phase or a switch key it does not use is refused."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _replies import eval_reply, reply, train_metrics
from _round_loop import run_in_process
from flwr.serverapp.strategy import FedAvg

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.config_docs import TABLE_END, TABLE_START, strategy_table, with_strategy_table
from fedq.common.strategy_registry import (
    STRATEGY_REGISTRY,
    StrategySpec,
    register_strategy,
    strategy_names,
)
from fedq.server.strategies import choose_strategy

ROOT = Path(__file__).resolve().parents[1]


class FirstUpdate(FedAvg):
    """A trivial strategy: the global model becomes the first accepted update."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        _, metrics = super().aggregate_train(server_round, replies)
        return replies[0].content["arrays"], metrics


class _Federation:
    """Nodes 1-3; node i adds 0.01 x i to every weight it is sent."""

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                weights = {k: a.numpy() + 0.01 * node for k, a in msg.content["arrays"].items()}
                replies.append(reply(node, weights, train_metrics(num_examples=100)))
            else:
                replies.append(eval_reply(node))
        return replies


@pytest.fixture
def first_update() -> Iterator[StrategySpec]:
    spec = register_strategy(StrategySpec(
        "first-update", "the first accepted update becomes the global model",
        lambda config: (FirstUpdate, {}), averages=True))
    yield spec
    del STRATEGY_REGISTRY[spec.name]


def test_a_strategy_is_unknown_until_registered():
    with pytest.raises(ConfigError, match="config field 'strategy': one of"):
        FedqConfig.from_mapping({"strategy": "first-update"})


def test_a_strategy_registered_in_a_test_is_validated_built_and_runs_a_round(
        tmp_path, first_update, server_process):
    config = FedqConfig.from_mapping({"strategy": "first-update"})
    assert type(choose_strategy(config)) is FirstUpdate
    assert "first-update" in strategy_names()
    (row,), initial, final = run_in_process(tmp_path, _Federation(),
                                            strategy="first-update")
    assert row["train"]["clients"] == 3
    for key in initial:  # node 1's update (+0.01), not the mean of the three (+0.02)
        np.testing.assert_allclose(final[key], initial[key] + 0.01, rtol=0, atol=1e-6)
    # central DP is allowed for it because it declares that it averages
    FedqConfig.from_mapping({"strategy": "first-update", "central-dp": "server-fixed",
                             "central-dp-clients": 3})
    assert "| `first-update` | the first accepted update" in strategy_table()


def test_central_dp_is_refused_for_strategies_that_do_not_average():
    with pytest.raises(ConfigError, match=r"config field 'strategy'.*use fedavg or fedprox"):
        FedqConfig.from_mapping({"strategy": "krum", "central-dp": "server-fixed",
                                 "central-dp-clients": 3})


@pytest.mark.parametrize(("spec", "message"), [
    (StrategySpec("fedavg", "again", lambda c: (FedAvg, {})), "already registered"),
    (StrategySpec("ring", "", lambda c: (FedAvg, {}), train_phase="ring"), "train phase"),
    (StrategySpec("mu", "", lambda c: (FedAvg, {}), switch="proximal-mu"), "switch"),
])
def test_bad_registrations_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        register_strategy(spec)
    assert spec.name == "fedavg" or spec.name not in STRATEGY_REGISTRY


def test_the_strategy_table_in_the_docs_is_what_the_registry_generates():
    path = ROOT / "docs" / "strategies.md"
    text = path.read_text()
    assert TABLE_START in text and TABLE_END in text
    assert text == with_strategy_table(text), (
        "docs/strategies.md's strategy table is stale: regenerate it with "
        "`python -m fedq.common.config_docs` from the repository root")
    assert [f"`{n}`" for n in strategy_names()] == [
        line.split("|")[1].split()[0] for line in strategy_table().splitlines()[2:]]
