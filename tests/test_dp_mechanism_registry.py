"""A device-side DP mechanism is one registration (common/dp_mechanism_registry.py): a
mechanism registered here, in a test, is accepted by config validation for the backends
and accountants it names, and a device trains with the learner its builder makes (every
update in the device's ledger); names, backends and accountants it does not serve are
refused naming the field; the docs table is what the registry generates."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.config_docs import (
    DP_TABLE_END,
    DP_TABLE_START,
    dp_mechanism_table,
    with_dp_mechanism_table,
)
from fedq.common.dp_mechanism_registry import (
    DP_MECHANISM_REGISTRY,
    DpBackend,
    DpMechanism,
    dp_mechanism_names,
    register_dp_mechanism,
)
from fedq.common.numpy_learner import PrivateNumpyDQNLearner
from fedq.common.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"hidden-sizes": "16", "buffer-size": 600, "batch-size": 16, "learning-starts": 100,
         "dp-enabled": True}


class CountingLearner(PrivateNumpyDQNLearner):
    """DP-SGD that counts its steps: stands in for a new mechanism's learner."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def update(self) -> float:
        self.steps += 1
        return super().update()


@pytest.fixture
def counted() -> Iterator[DpMechanism]:
    mechanism = register_dp_mechanism(DpMechanism(
        "counted-sgd", "DP-SGD that counts its steps (a test's mechanism)",
        {"numpy": DpBackend(("rdp",), lambda obs, actions, config, privacy, seed:
                            CountingLearner(obs, actions, config, privacy, seed))}))
    yield mechanism
    del DP_MECHANISM_REGISTRY[mechanism.name]


def test_a_mechanism_registered_in_a_test_trains_a_device_and_fills_its_ledger(counted):
    assert "counted-sgd" in dp_mechanism_names()
    config = FedqConfig.from_mapping({**SMALL, "backend": "numpy",
                                      "dp-mechanism": "counted-sgd"})
    device = LocalTrainer(config, 0)
    device.train(400)
    assert isinstance(device.learner, CountingLearner)
    assert device.learner.steps == 300  # one update per env step after learning-starts
    assert sum(k for _, _, k in device.privacy.history) == 300
    assert 0 < device.privacy.epsilon() < float("inf")


def test_the_default_mechanism_builds_each_backends_private_learner():
    from fedq.common.dqn import PrivateDQNLearner

    for backend, cls in [("torch", PrivateDQNLearner), ("numpy", PrivateNumpyDQNLearner)]:
        device = LocalTrainer(FedqConfig.from_mapping({**SMALL, "backend": backend}), 0)
        assert type(device.learner) is cls


def test_a_backend_the_mechanism_does_not_serve_is_refused_naming_the_field(counted):
    with pytest.raises(ConfigError, match=r"'dp-mechanism'.*not registered for backend "
                                          r"'torch' \(it serves numpy\)"):
        FedqConfig.from_mapping({**SMALL, "dp-mechanism": "counted-sgd"})
    # without dp-enabled the mechanism is not used, so nothing to refuse
    FedqConfig.from_mapping({"dp-mechanism": "counted-sgd"})


def test_an_accountant_the_backend_does_not_serve_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"'dp-accountant'.*'prv' with dp-sgd needs backend "
                                          r"'torch'; on backend 'numpy' it is accounted "
                                          r"with rdp"):
        FedqConfig.from_mapping({**SMALL, "backend": "numpy", "dp-accountant": "prv"})


def test_an_unregistered_mechanism_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match=r"config field 'dp-mechanism': one of \('dp-sgd',\) "
                                          r"\(did you mean 'dp-sgd'\?\)"):
        FedqConfig.from_mapping({"dp-mechanism": "dpsgd"})


@pytest.mark.parametrize(("mechanism", "message"), [
    (DpMechanism("dp-sgd", "", {"numpy": DpBackend(("rdp",), print)}), "already registered"),
    (DpMechanism("empty", "", {}), "at least one accountant"),
    (DpMechanism("none", "", {"numpy": DpBackend((), print)}), "at least one accountant"),
])
def test_bad_registrations_are_refused(mechanism, message):
    with pytest.raises(ValueError, match=message):
        register_dp_mechanism(mechanism)
    assert list(DP_MECHANISM_REGISTRY) == ["dp-sgd"]


def test_the_mechanism_table_in_the_docs_is_what_the_registry_generates():
    text = (ROOT / "docs" / "privacy.md").read_text()
    assert DP_TABLE_START in text and DP_TABLE_END in text
    assert text == with_dp_mechanism_table(text), (
        "docs/privacy.md's dp-mechanism table is stale: regenerate it with "
        "`python -m fedq.common.config_docs` from the repository root")
    assert "| `dp-sgd` (default) |" in dp_mechanism_table()
    assert "`torch`: `rdp`, `prv`; `numpy`: `rdp`" in dp_mechanism_table()
