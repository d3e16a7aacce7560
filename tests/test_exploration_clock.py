"""Through the ClientApp, as a federation drives it: with ``exploration-clock =
"federation"`` a device takes its epsilon from the round config's count of env steps
already in the global model (and refuses a round config without a usable one, naming
the field); with the default device clock it ignores that count. The query handler
tells the server which partition a node is (the sequential strategy's order)."""

import pytest
import torch
from _replies import device_context, instruction
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedq.client.client_app import app
from fedq.common.config import FEDERATION_STEPS_KEY, FedqConfig
from fedq.common.networks import QNetwork

SMALL = {"hidden-sizes": "16,16", "buffer-size": 2000, "batch-size": 32,
         "learning-starts": 100, "exploration-steps": 1000, "exploration-final-eps": 0.05}


def _train(tmp_path, partition, clock, **round_config):
    torch.manual_seed(0)
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path),
                  "exploration-clock": clock}
    message = instruction(partition, "train", RecordDict({
        "arrays": ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict()),
        "config": ConfigRecord({"local-steps": 200, **round_config})}))
    return app(message, device_context(partition, run_config))


def test_federation_clock_takes_epsilon_from_the_servers_count(tmp_path):
    reply = _train(tmp_path, 0, "federation", **{FEDERATION_STEPS_KEY: 600})
    assert reply.content["metrics"]["epsilon"] == 1.0 - 0.95 * (600 + 200) / 1000
    device_clock = _train(tmp_path, 1, "device", **{FEDERATION_STEPS_KEY: 600})
    assert device_clock.content["metrics"]["epsilon"] == 1.0 - 0.95 * 200 / 1000


@pytest.mark.parametrize("bad", [{}, {FEDERATION_STEPS_KEY: -5}, {FEDERATION_STEPS_KEY: 2.5}])
def test_federation_clock_without_a_count_is_an_error_naming_the_field(tmp_path, bad):
    """Flower turns the handler's exception into an error reply the server logs."""
    with pytest.raises(ValueError, match=f"round config field '{FEDERATION_STEPS_KEY}'"):
        _train(tmp_path, 0, "federation", **bad)


def test_query_answers_with_the_devices_partition(tmp_path):
    run_config = {**FedqConfig().to_mapping(), "run-dir": str(tmp_path)}
    reply = app(instruction(1, "query", RecordDict()), device_context(1, run_config))
    assert reply.content["metrics"]["partition-id"] == 1
