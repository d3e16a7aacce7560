"""A central-DP mode is one registration (common/central_dp_registry.py): a mode
registered here, in a test, is accepted by config validation and wraps the server's
strategy in the Flower class it names; the built-in modes wrap in Flower's fixed-clipping
classes and ``none`` wraps nothing; unknown modes are refused naming the field."""

from collections.abc import Iterator

import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from fedq.common.central_dp_registry import (
    CENTRAL_DP_REGISTRY,
    CentralDpMode,
    central_dp_names,
    register_central_dp,
)
from fedq.common.config import ConfigError, FedqConfig
from fedq.server.server_app import build_strategy

DP = {"central-dp-clients": 2, "central-dp-clip-norm": 0.5, "central-dp-noise-multiplier": 0.7}


@pytest.fixture
def adaptive() -> Iterator[CentralDpMode]:
    mode = register_central_dp(CentralDpMode(
        "server-adaptive", "Flower's adaptive clipping on the server",
        lambda strategy, config: DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise_multiplier=config.central_dp_noise_multiplier,
            num_sampled_clients=config.central_dp_clients,
            initial_clipping_norm=config.central_dp_clip_norm, clipped_count_stddev=1.0)))
    yield mode
    del CENTRAL_DP_REGISTRY[mode.name]


@pytest.mark.parametrize(("mode", "cls"), [
    ("server-fixed", DifferentialPrivacyServerSideFixedClipping),
    ("client-fixed", DifferentialPrivacyClientSideFixedClipping),
])
def test_built_in_modes_wrap_the_strategy_in_flowers_class(mode, cls):
    strategy = build_strategy(FedqConfig.from_mapping({"central-dp": mode, **DP}))
    assert type(strategy) is cls
    assert (strategy.noise_multiplier, strategy.clipping_norm,
            strategy.num_sampled_clients) == (0.7, 0.5, 2)


def test_none_wraps_nothing():
    assert type(build_strategy(FedqConfig())) is FedAvg


def test_a_mode_registered_in_a_test_is_validated_and_wraps_the_strategy(adaptive):
    assert "server-adaptive" in central_dp_names()
    strategy = build_strategy(FedqConfig.from_mapping({"central-dp": "server-adaptive", **DP}))
    assert type(strategy) is DifferentialPrivacyServerSideAdaptiveClipping
    assert strategy.clipping_norm == 0.5  # its initial norm, from central-dp-clip-norm


def test_an_unregistered_mode_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="config field 'central-dp': one of"):
        FedqConfig.from_mapping({"central-dp": "server-adaptive", **DP})


def test_a_mode_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_central_dp(CentralDpMode("none", "", None))
