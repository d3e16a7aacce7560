"""The network registry and its one factory: the default MLP is the network the code
before the registry built, configs refuse networks a backend or an env cannot serve, and
the docs table comes from the registry."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedq.common.cnn import ConvQNetwork
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.config_docs import networks_markdown
from fedq.common.mlp_params import FlatParams, mlp_layout
from fedq.common.network_registry import (
    NETWORK_REGISTRY,
    NetworkSpec,
    build_network,
    network_names,
    register_network,
)
from fedq.common.networks import QNetwork
from fedq.server.server_app import initial_model

ROOT = Path(__file__).resolve().parents[1]

# Recorded on main at 6d4a8ff (before the registry): the server's initial model, which
# only torch's seeded generator decides (no float arithmetic path), so it holds on any CPU.
# A seeded training run's bytes depend on the CPU's float path, so the same-run evidence
# for training is the README job's per-round rows compared across versions, not a hash.
MAIN_INITIAL_MODEL_HASH = "623ac182763c7d85b1a8cd079247ddedc42fb8382de7f8ed2b605301b76444ea"


def test_the_factory_builds_the_mlp_the_learners_built_before_the_registry():
    """Same class, parameter names, shapes and initial bytes as the direct constructors
    the six call sites used, on both backends, under the same seed."""
    config = FedqConfig.from_mapping({"hidden-sizes": "16,16"})
    torch.manual_seed(3)
    built = build_network(config, 4, 2)
    torch.manual_seed(3)
    direct = QNetwork(4, 2, (16, 16))
    assert type(built) is QNetwork
    assert {k: v.tolist() for k, v in built.state_dict().items()} == \
        {k: v.tolist() for k, v in direct.state_dict().items()}
    numpy_built = build_network(FedqConfig.from_mapping({"hidden-sizes": "16,16",
                                                         "backend": "numpy"}), 4, 2)
    numpy_direct = FlatParams(mlp_layout(4, 2, (16, 16)))
    numpy_built.init_like_torch(np.random.default_rng(3))
    numpy_direct.init_like_torch(np.random.default_rng(3))
    assert numpy_built.layout == numpy_direct.layout
    assert numpy_built.flat.tobytes() == numpy_direct.flat.tobytes()


def test_server_initial_model_is_bit_identical_to_main_before_the_registry():
    net = initial_model(FedqConfig.from_mapping({"hidden-sizes": "16,16", "seed": 3}), None)
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    assert h.hexdigest() == MAIN_INITIAL_MODEL_HASH


def test_factory_builds_each_registered_network_for_its_observations():
    mlp = build_network(FedqConfig(), 4, 2)
    assert isinstance(mlp, QNetwork) and mlp(torch.zeros(3, 4)).shape == (3, 2)
    numpy_mlp = build_network(FedqConfig(backend="numpy"), 4, 2)
    assert numpy_mlp.layout == {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    frames = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    sizes = {}
    for name in ("nature-cnn", "edge-cnn"):
        import gymnasium as gym

        space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        net = build_network(FedqConfig(network=name), space, 5)
        assert isinstance(net, ConvQNetwork) and net(frames).shape == (2, 5)
        sizes[name] = sum(p.numel() for p in net.parameters())
    assert sizes["edge-cnn"] < sizes["nature-cnn"] / 4


def test_cnn_reads_each_image_layout_gymnasiums_wrappers_produce():
    import gymnasium as gym

    for shape, channels in [((84, 84), 1), ((96, 96, 3), 3), ((4, 84, 84), 4),
                            ((2, 64, 64, 3), 6)]:
        net = build_network(FedqConfig(network="edge-cnn"),
                            gym.spaces.Box(0, 255, shape, np.uint8), 3)
        assert net.features[0].in_channels == channels
        assert net(torch.zeros((1, *shape), dtype=torch.uint8)).shape == (1, 3)


def test_config_refuses_a_cnn_on_the_numpy_backend_naming_the_field():
    with pytest.raises(ConfigError, match=r"'network'.*'nature-cnn' runs on backend torch, "
                                          r"not 'numpy'"):
        FedqConfig.from_mapping({"network": "nature-cnn", "backend": "numpy"})
    with pytest.raises(ConfigError, match=r"'network'.*one of"):
        FedqConfig.from_mapping({"network": "resnet"})


def test_registry_refuses_duplicates_and_unknown_observation_kinds():
    with pytest.raises(ValueError, match="already registered"):
        register_network(NETWORK_REGISTRY["mlp"])
    with pytest.raises(ValueError, match="observations"):
        register_network(NetworkSpec("x", "x", {"torch": "m:f"}, ("audio",)))


def test_networks_doc_is_generated_from_the_registry():
    text = networks_markdown()
    for name in network_names():
        assert f"`{name}`" in text
    assert "| `mlp` (default) |" in text and "torch, numpy" in text
    assert (ROOT / "docs" / "networks.md").read_text() == text, (
        "docs/networks.md is stale: run python -m fedq.common.config_docs")
