"""Each ``strategy`` choice aggregates a known set of device updates to the result its
algorithm defines, driven through the same configure_train / aggregate_train calls as
``server.server_app.run_rounds``; and the strategy keys are validated with the field named."""

import numpy as np
import pytest
from _replies import as_numpy, error_reply, reply, train_metrics
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from fedq.common.config import ConfigError, FedqConfig
from fedq.server.run_directory import RunDirectory
from fedq.server.server_app import _as_tensors, in_device_order, resume_strategy
from fedq.server.strategies import choose_strategy, optimizer_state, restore_optimizer_state

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}


class _Nodes:
    """The one thing configure_train asks of a Grid: which nodes are connected."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids


def _updates(values, weights=None):
    """One reply per value: every weight of device i equals values[i]."""
    weights = weights or [100] * len(values)
    return [reply(i + 1, {k: np.full_like(g, v) for k, g in GLOBAL.items()},
                  train_metrics(num_examples=n))
            for i, (v, n) in enumerate(zip(values, weights, strict=True))]


def _aggregate(config, values, weights=None):
    strategy = choose_strategy(FedqConfig.from_mapping(config))
    messages = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                        ConfigRecord({"local-steps": 10}),
                                        _Nodes(len(values)))
    arrays, metrics = strategy.aggregate_train(1, _updates(values, weights))
    return strategy, list(messages), as_numpy(arrays), metrics


@pytest.mark.parametrize(("config", "cls"), [
    ({}, FedAvg), ({"strategy": "fedprox", "proximal-mu": 0.1}, FedProx),
    ({"strategy": "fedavgm", "server-momentum": 0.5}, FedAvgM),
    ({"strategy": "fedadam"}, FedAdam), ({"strategy": "fedyogi"}, FedYogi),
    ({"strategy": "fedmedian"}, FedMedian), ({"strategy": "fedtrimmedavg"}, FedTrimmedAvg),
    ({"strategy": "krum"}, Krum),
])
def test_config_key_selects_the_strategy_class(config, cls):
    assert type(choose_strategy(FedqConfig.from_mapping(config))) is cls


def test_fedavg_is_the_env_step_weighted_mean(server_process):
    _, _, arrays, metrics = _aggregate({}, [1.0, 4.0], weights=[300, 100])
    np.testing.assert_allclose(arrays["w"], 1.75)  # (3 * 1 + 1 * 4) / 4
    assert metrics["clients"] == 2 and metrics["env-steps"] == 400


def test_fedprox_averages_like_fedavg_and_sends_mu_to_devices(server_process):
    _, messages, arrays, _ = _aggregate({"strategy": "fedprox", "proximal-mu": 0.25},
                                        [1.0, 4.0], weights=[300, 100])
    np.testing.assert_allclose(arrays["b"], 1.75)
    assert {m.content["config"]["proximal-mu"] for m in messages} == {0.25}


def _next_round(strategy, server_round, global_arrays, values):
    strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in
                                                        global_arrays.items()}),
                             ConfigRecord(), _Nodes(len(values)))
    arrays, _ = strategy.aggregate_train(server_round, _updates(values))
    return as_numpy(arrays)


def test_fedavgm_adds_up_the_mean_updates_with_server_momentum(server_process):
    beta = 0.5
    strategy, _, first, _ = _aggregate({"strategy": "fedavgm", "server-momentum": beta},
                                       [0.2, 0.4])
    np.testing.assert_allclose(first["w"], 0.3)  # round 1: v = mean update, w += v
    # round 2: the devices again move 0.3 from the new global model:
    # v = beta * 0.3 + 0.3, w = 0.3 + v
    second = _next_round(strategy, 2, first, [0.5, 0.7])
    np.testing.assert_allclose(second["w"], 0.3 + beta * 0.3 + 0.3, rtol=1e-6)


@pytest.mark.parametrize("config", [
    {"strategy": "fedavgm", "server-momentum": 0.5},
    {"strategy": "fedadam", "server-learning-rate": 0.05},
])
def test_a_resumed_server_continues_its_optimiser_state_from_the_checkpoint(
        server_process, tmp_path, config):
    """A server restart between rounds 1 and 2 must not change round 2's aggregate."""
    fedq_config = FedqConfig.from_mapping(config)
    strategy, _, first, _ = _aggregate(config, [0.2, 0.4])
    run_dir = RunDirectory(tmp_path)
    run_dir.start(fedq_config)
    run_dir.save_checkpoint(1, {}, {"strategy": config["strategy"],
                                    "server-optimizer": _as_tensors(optimizer_state(strategy))})
    round_2 = [first["w"][0, 0] + 0.3] * 2  # devices move 0.3 from the new global model
    uninterrupted = _next_round(strategy, 2, first, round_2)

    restarted = choose_strategy(fedq_config)
    resume_strategy(restarted, fedq_config, run_dir.load_checkpoint(1))
    resumed = _next_round(restarted, 2, first, round_2)
    for key in GLOBAL:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-6)
    # and the state mattered: a server that forgot it aggregates differently
    forgot = _next_round(choose_strategy(fedq_config), 2, first, round_2)
    assert not np.allclose(forgot["w"], uninterrupted["w"])


def test_a_resumed_run_with_another_strategy_starts_its_optimiser_afresh(server_process):
    """FedAdam moments in the checkpoint must not be forced into a FedAvgM server: it
    starts from zero (with a warning); handed over directly, such state is refused."""
    adam, *_ = _aggregate({"strategy": "fedadam"}, [0.2, 0.4])
    saved = optimizer_state(adam)
    fedavgm_config = FedqConfig.from_mapping({"strategy": "fedavgm", "server-momentum": 0.5})
    fedavgm = choose_strategy(fedavgm_config)
    resume_strategy(fedavgm, fedavgm_config, {"strategy": "fedadam",
                                              "server-optimizer": _as_tensors(saved)})
    assert optimizer_state(fedavgm) == {}
    with pytest.raises(ValueError, match=r"\['m_t', 'v_t'\] that strategy FedAvgM does not"):
        restore_optimizer_state(fedavgm, saved)


def test_fedadam_takes_a_bias_corrected_adam_step_on_the_mean_update(server_process):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    config = {"strategy": "fedadam", "server-learning-rate": eta, "server-beta1": b1,
              "server-beta2": b2, "server-tau": tau}
    strategy, _, arrays, _ = _aggregate(config, [0.2, 0.4])
    delta = 0.3  # mean update of round 1; first and second moments start at zero
    m, v = (1 - b1) * delta, (1 - b2) * delta ** 2
    step = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2) * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(arrays["w"], step, rtol=1e-5)
    # the server optimiser's state carries to the next round: a second identical
    # update moves the model on from the new global weights
    new_global = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    strategy.configure_train(2, new_global, ConfigRecord(), _Nodes(2))
    second, _ = strategy.aggregate_train(2, _updates([step + 0.3, step + 0.3]))
    assert (as_numpy(second)["w"] > arrays["w"]).all()


def test_fedyogi_scales_the_step_by_its_yogi_second_moment(server_process):
    eta, b1, b2, tau = 0.02, 0.9, 0.99, 1e-3
    config = {"strategy": "fedyogi", "server-learning-rate": eta, "server-beta1": b1,
              "server-beta2": b2, "server-tau": tau}
    _, _, arrays, _ = _aggregate(config, [-0.1, -0.3])
    delta = -0.2
    m, v = (1 - b1) * delta, (1 - b2) * delta ** 2  # Yogi from v = 0: v + (1-b2) d^2
    np.testing.assert_allclose(arrays["b"], eta * m / (np.sqrt(v) + tau), rtol=1e-5)


def test_fedmedian_takes_the_coordinate_wise_median(server_process):
    _, _, arrays, _ = _aggregate({"strategy": "fedmedian"}, [1.0, 2.0, 100.0],
                                 weights=[1, 1, 1000])
    np.testing.assert_allclose(arrays["w"], 2.0)  # unweighted: the big weight buys nothing


def test_fedtrimmedavg_cuts_the_extremes_then_averages(server_process):
    _, _, arrays, _ = _aggregate({"strategy": "fedtrimmedavg", "trim-beta": 0.2},
                                 [-50.0, 1.0, 2.0, 3.0, 90.0])
    np.testing.assert_allclose(arrays["w"], 2.0)  # 1 of 5 cut at each end


def test_krum_picks_the_update_closest_to_its_neighbours(server_process):
    # f = 1: score = squared distance to the n - f - 2 = 2 nearest others; 1.05 has
    # 1.0 and 1.1 at 0.05 each, every other update has a nearer pair further away
    _, _, arrays, _ = _aggregate({"strategy": "krum", "krum-byzantine": 1},
                                 [1.0, 1.1, 0.9, 1.05, 50.0])
    np.testing.assert_allclose(arrays["w"], 1.05)


@pytest.mark.parametrize(("mapping", "key", "message"), [
    ({"strategy": "fedsgd"}, "strategy", "one of"),
    ({"strategy": "fedprox"}, "proximal-mu", "needs proximal-mu > 0"),
    ({"proximal-mu": 0.1}, "proximal-mu", "with strategy fedavg"),
    ({"strategy": "fedprox", "proximal-mu": -1.0}, "proximal-mu", "must be >= 0"),
    ({"server-learning-rate": 0.0}, "server-learning-rate", "must be > 0"),
    ({"strategy": "fedavgm"}, "server-momentum", "needs server-momentum > 0"),
    ({"server-momentum": 0.9}, "server-momentum", "with strategy fedavg"),
    ({"strategy": "fedavgm", "server-momentum": 1.0}, "server-momentum", "[0, 1)"),
    ({"server-beta1": 1.0}, "server-beta1", "[0, 1)"),
    ({"server-beta2": -0.1}, "server-beta2", "[0, 1)"),
    ({"server-tau": 0.0}, "server-tau", "must be > 0"),
    ({"trim-beta": 0.5}, "trim-beta", "[0, 0.5)"),
    ({"krum-byzantine": -1}, "krum-byzantine", "must be >= 0"),
])
def test_strategy_keys_are_validated_naming_the_field(mapping, key, message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        FedqConfig.from_mapping(mapping)
    assert message in str(err.value)


def test_fedavg_gives_the_same_global_model_whatever_order_the_replies_arrive_in():
    # float32 values whose weighted sum depends on the order they are added in:
    # (1e8 + 1) - 1e8 rounds to 0, (1e8 - 1e8) + 1 is 1
    values = {0: 1e8, 1: 1.0, 2: -1e8}
    replies = {p: reply(10 + 7 * (2 - p), {"w": np.full(3, v, np.float32)},
                        MetricRecord({**train_metrics(), "partition-id": p}))
               for p, v in values.items()}
    arrivals = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)]

    def fedavg(messages):
        arrays, _ = choose_strategy(FedqConfig()).aggregate_train(1, messages)
        return as_numpy(arrays)["w"]

    as_arrived = {fedavg([replies[p] for p in order]).tobytes() for order in arrivals}
    in_order = {fedavg(in_device_order([replies[p] for p in order])).tobytes()
                for order in arrivals}
    assert len(as_arrived) > 1  # the arithmetic really is order-dependent
    assert len(in_order) == 1


def test_failed_replies_sort_after_the_devices_that_answered():
    ordered = in_device_order([error_reply(1), reply(9, GLOBAL, MetricRecord(
        {**train_metrics(), "partition-id": 1})), reply(3, GLOBAL, MetricRecord(
            {**train_metrics(), "partition-id": 0}))])
    assert [m.metadata.src_node_id for m in ordered] == [3, 9, 1]
