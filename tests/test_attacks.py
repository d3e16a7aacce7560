"""Simulated attackers live in the simulation layer, not in the product: ``attack`` is no
config key of fedq, and fedq's own ClientApp replies honestly whatever a simulation
wants. The attacker app (fedq's ClientApp plus simulations/attacks.py's train mod) makes
only the listed partitions send NaN or large-noise weights, reproducibly (the same seed
gives the same noise), also through update compression, while the attacker's own saved
state stays honest."""

import importlib
import json
import sys
import tomllib

import numpy as np
import pytest
import torch
from _replies import device_context, instruction
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedq.client.client_app import app as product_app
from fedq.client.device import SEED_STRIDE
from fedq.common.compression import decode_update
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.trainer import LocalTrainer
from fedq.simulations.attacks import (
    APP_MODULE,
    Attack,
    AttackError,
    attacker_app,
    attacker_client_app,
)
from fedq.simulations.run import APP_DIR, app_defaults

SMALL = {"hidden-sizes": "16,16", "buffer-size": 500, "batch-size": 32,
         "learning-starts": 100, "exploration-steps": 500}


def _global_record() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())


def _train(app, tmp_path, partition: int, compression: str = "none"):
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path)}
    message = instruction(partition, "train", RecordDict({
        "arrays": _global_record(),
        "config": ConfigRecord({"local-steps": 150, "update-compression": compression})}))
    return app(message, device_context(partition, run_config))


def _sent(reply, compression: str = "none") -> dict[str, np.ndarray]:
    global_record = _global_record()
    global_weights = {k: global_record[k].numpy() for k in global_record}
    return decode_update(reply.content["arrays"], global_weights, compression)


def test_attack_is_no_product_config_key():
    for key in ("attack", "attack-partitions", "attack-scale"):
        with pytest.raises(ConfigError, match=f"config field '{key}': unknown key"):
            FedqConfig.from_mapping({key: "1"})
        assert key not in app_defaults()


def test_only_listed_partitions_send_nan_and_the_rest_reply_as_the_product(tmp_path):
    attacker = attacker_client_app(Attack("nan", (1,)))
    attacked = _sent(_train(attacker, tmp_path / "attacked", 1))
    assert all(np.isnan(v).all() for v in attacked.values())
    honest = _sent(_train(attacker, tmp_path / "attacked", 0))
    product = _sent(_train(product_app, tmp_path / "product", 0))
    for k, v in product.items():  # same seed, same device: the very same weights
        np.testing.assert_array_equal(honest[k], v)
        assert np.isfinite(v).all()
    product_partition_1 = _sent(_train(product_app, tmp_path / "product", 1))
    assert all(np.isfinite(v).all() for v in product_partition_1.values())


def test_noise_attack_sends_global_plus_seeded_gaussian_noise(tmp_path):
    reply = _train(attacker_client_app(Attack("noise", (0, 2), scale=5.0)), tmp_path, 2)
    global_record = _global_record()
    # the device's seed (run seed 0 + stride x partition) and its rounds-total (1)
    rng = np.random.default_rng([SEED_STRIDE * 2, 1])
    for k, sent in _sent(reply).items():
        expected = (global_record[k].numpy() + rng.normal(0.0, 5.0, sent.shape))
        np.testing.assert_array_equal(sent, expected.astype(np.float32))


def test_a_compressed_attack_arrives_as_nan_and_the_devices_residual_stays_honest(tmp_path):
    reply = _train(attacker_client_app(Attack("nan", (1,))), tmp_path, 1, "int8")
    assert set(reply.content["arrays"].keys()) == {"delta-int8", "delta-scales"}
    assert all(np.isnan(v).all() for v in _sent(reply, "int8").values())
    config = FedqConfig.from_mapping({**SMALL, "run-dir": str(tmp_path)})
    trainer = LocalTrainer(config, seed=SEED_STRIDE)
    trainer.load(tmp_path / "devices" / "partition-1")
    assert trainer.update_residual  # kept on disk for the next round, and finite
    assert all(np.isfinite(v).all() for v in trainer.update_residual.values())
    trainer.close()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"kind": "flip", "partitions": (1,)}, "kind"),
    ({"kind": "nan", "partitions": ()}, "partitions"),
    ({"kind": "nan", "partitions": (-1,)}, "partitions"),
    ({"kind": "noise", "partitions": (1,), "scale": 0.0}, "scale"),
    ({"kind": "noise", "partitions": (1,), "scale": float("nan")}, "scale"),
])
def test_bad_attack_settings_name_the_field(kwargs, field):
    with pytest.raises(AttackError, match=f"attack field '{field}'"):
        Attack(**kwargs)


def test_attack_parses_command_line_partitions():
    assert Attack.parse("noise", "1, 3", 2.0) == Attack("noise", (1, 3), 2.0)
    with pytest.raises(AttackError, match="attack field 'partitions'"):
        Attack.parse("nan", "1,x")


def test_attacker_app_is_the_product_app_with_another_client_app(tmp_path, monkeypatch):
    attack = Attack("noise", (3,), 2.5)
    derived = attacker_app(APP_DIR, tmp_path, attack)
    project = tomllib.loads((derived / "pyproject.toml").read_text())
    original = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": original["tool"]["flwr"]["app"]["components"]["serverapp"],
        "clientapp": f"{APP_MODULE}:app"}
    assert project["tool"]["flwr"]["app"]["config"] == original["tool"]["flwr"]["app"]["config"]
    monkeypatch.syspath_prepend(str(derived))
    monkeypatch.delitem(sys.modules, APP_MODULE, raising=False)
    module = importlib.import_module(APP_MODULE)
    assert "train.default" in module.app._registered_funcs  # a ClientApp with fedq's handlers
    assert Attack.from_json(attack.to_json()) == attack


def test_fedq_simulate_refuses_partitions_without_an_attack(tmp_path, capsys):
    from fedq.simulations.run import main

    assert main(["--attack-partitions", "1", "--run-dir", str(tmp_path / "run")]) == 2
    assert "attack field 'partitions': --attack-partitions needs --attack" in \
        capsys.readouterr().err


def test_a_resumed_simulation_keeps_its_attack(tmp_path):
    from fedq.simulations.run import SIMULATION_FILE, simulation_attack

    attack = Attack("noise", (1,), 3.0)
    (tmp_path / SIMULATION_FILE).write_text(
        json.dumps({"clients": 2, "attack": attack.to_json()}))
    assert simulation_attack(tmp_path, None) == attack
    with pytest.raises(AttackError, match="a resume cannot change it"):
        simulation_attack(tmp_path, Attack("nan", (1,)))


def test_no_product_module_imports_the_simulation_layer():
    """The product (common/, client/, server/) runs on devices and servers without the
    simulations; attacks and process orchestration stay on the simulation side."""
    import ast

    root = APP_DIR
    offenders = []
    for package in ("common", "client", "server"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(root)}: {n}" for n in names
                              if n.split(".")[:2] == ["fedq", "simulations"]
                              or n.split(".")[0] == "simulations"]
    assert offenders == []


def test_benchmark_cells_cached_with_the_old_attack_keys_still_score(tmp_path):
    """Cells cached before attacks left the product config keep ``attack`` keys in their
    config.json; the benchmarks reuse them rather than failing on an unknown key."""
    from fedq.simulations.federated_cell import checkpoint_score

    config = {**FedqConfig().to_mapping(), "hidden-sizes": "8", "attack": "nan",
              "attack-partitions": "4", "attack-scale": 10.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": QNetwork(4, 2, (8,)).state_dict()},
               tmp_path / "checkpoints" / "round-0001.pt")
    score = checkpoint_score(tmp_path, episodes=2)
    assert 1.0 <= score <= 500.0  # CartPole returns of a (random) greedy policy
