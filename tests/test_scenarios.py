"""Scenario files (simulations/scenario.py) and how their per-client settings reach each
virtual device: every shipped scenario loads, heterogeneous draws are what the file says,
every kind of mistake names the client and the field, a device resolves exactly its own
partition's overrides, and personalisation leaves the device's saved state alone."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedq.client.device import device_from_context
from fedq.client.personalize import personalized_returns
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.run import app_defaults, main
from fedq.simulations.scenario import SCENARIOS_DIR, ScenarioError, load_scenario

_NEEDS = {"lunar_lander": "Box2D", "highway": "highway_env", "car_racing_pixels": "Box2D"}


@pytest.mark.parametrize("path", sorted(SCENARIOS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path):
    module = _NEEDS.get(path.stem)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}")
    scenario = load_scenario(path, defaults=app_defaults())
    assert scenario.num_clients >= 1 and scenario.description


def test_hetero_cartpole_draws_pole_lengths_per_client_independent_of_size():
    path = SCENARIOS_DIR / "hetero_cartpole.toml"
    small = load_scenario(path, num_clients=4, defaults=app_defaults())
    large = load_scenario(path, num_clients=50, defaults=app_defaults())
    lengths = [json.loads(c["env-physics"])["length"] for c in large.clients]
    assert all(0.1 <= x <= 0.9 for x in lengths)
    assert max(lengths) - min(lengths) > 0.5  # spread over the range, not one value
    assert small.clients == large.clients[:4]  # client k's draw does not depend on N
    assert load_scenario(path, num_clients=4, defaults=app_defaults()).clients == small.clients


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('num-clients = 2\n[run]\nenv-id = "CartPole-v1"\n' + body)
    return path


@pytest.mark.parametrize(("body", "client", "field"), [
    ('[all-clients]\nphysics = { length = -0.5 }\n', 0, "physics.length"),
    ('[all-clients]\nphysics = { lenght = 0.5 }\n', 0, "physics.lenght"),
    ('[all-clients]\nphysics = { length = { uniform = [11.0, 12.0] } }\n', 0,
     "physics.length"),  # a drawn value out of range
    ('[all-clients]\nphysics = { length = { uniform = [0.9, 0.1] } }\n', 0, "physics.length"),
    ('[all-clients]\nphysics = { length = { unifrom = [0.1, 0.9] } }\n', 0, "physics.length"),
    ('[all-clients]\nphysics = { length = { normal = [0.5, -1.0] } }\n', 0, "physics.length"),
    ('[all-clients]\nlearning-rate = { loguniform = [0.0, 0.1] }\n', 0, "learning-rate"),
    ('[all-clients]\nexploration-steps = { choice = [] }\n', 0, "exploration-steps"),
    ('[[client]]\n[[client]]\nlearning-rte = 0.1\n', 1, "learning-rte"),
    ('[[client]]\n[[client]]\nhidden-sizes = "8"\n', 1, "hidden-sizes"),  # federation-wide
    ('[[client]]\n[[client]]\nlearning-rate = -1.0\n', 1, "learning-rate"),
    ('[[client]]\n[[client]]\nenv-id = "Acrobot-v1"\n', 1, "env-id"),  # spaces differ
])
def test_bad_scenario_names_client_and_field(tmp_path, body, client, field):
    with pytest.raises(ScenarioError) as err:
        load_scenario(_write(tmp_path, body), defaults=app_defaults())
    assert err.value.client == client
    assert f"client {client}, field '{field}'" in str(err.value)


@pytest.mark.parametrize(("body", "field"), [
    ("[run]\n", "file"),  # a TOML error: [run] twice
    ("[colour]\nx = 1\n", "colour"),
    ("[[client]]\n", "num-clients"),  # 2 clients, 1 entry
])
def test_bad_scenario_file_names_the_field(tmp_path, body, field):
    with pytest.raises(ScenarioError, match=f"field '{field}'"):
        load_scenario(_write(tmp_path, body), defaults=app_defaults())


def test_fedq_simulate_refuses_a_bad_scenario_before_starting_anything(tmp_path, capsys):
    path = _write(tmp_path, '[all-clients]\nphysics = { length = 0.0 }\n')
    assert main(["--scenario", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "client 0, field 'physics.length'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _context(scenario_run: dict, partition: int, tmp_path: Path) -> Context:
    run_config = {**app_defaults(), **scenario_run, "run-dir": str(tmp_path / "run")}
    return Context(run_id=1, node_id=100 + partition, state=RecordDict(),
                   node_config={"partition-id": partition, "num-partitions": 3},
                   run_config=run_config)


def test_each_partition_gets_its_own_overrides(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('num-clients = 3\n[run]\nseed = 5\n[all-clients]\n'
                    'physics = { length = { uniform = [0.1, 0.9] } }\n'
                    '[[client]]\n[[client]]\nseed = 77\nlearning-rate = 0.002\n[[client]]\n')
    scenario = load_scenario(path, defaults=app_defaults())
    devices = [device_from_context(_context(scenario.run_config(), k, tmp_path))
               for k in range(3)]
    for k, device in enumerate(devices):
        assert device.config.env_physics == json.loads(scenario.clients[k]["env-physics"])
        assert device.partition == k and device.state_dir.name == f"partition-{k}"
    assert [d.seed for d in devices] == [5, 77, 5 + 2 * 1000]  # explicit seed kept as is
    assert [d.config.learning_rate for d in devices] == [5e-4, 0.002, 5e-4]
    trainer = LocalTrainer(devices[2].config, seed=devices[2].seed)
    assert trainer.env.unwrapped.length == devices[2].config.env_physics["length"]
    trainer.close()


def test_bad_client_override_names_partition_and_field():
    config = FedqConfig.from_mapping({"client-overrides": '{"3": {"gamma": 2.0}}'})
    with pytest.raises(ConfigError, match=r"'client-overrides\.3\.gamma'"):
        config.for_partition(3)
    with pytest.raises(ConfigError, match=r"'client-overrides\.x'"):
        FedqConfig.from_mapping({"client-overrides": '{"x": {}}'})


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_personalisation_fine_tunes_without_touching_device_state(tmp_path):
    tiny = {"hidden-sizes": "16,16", "buffer-size": 1000, "batch-size": 16,
            "learning-starts": 50, "eval-episodes": 2, "personalize-steps": 200}
    device = device_from_context(_context(tiny, 0, tmp_path))
    trainer = LocalTrainer(device.config, seed=device.seed)
    trainer.train(300)
    trainer.save(device.state_dir)
    trainer.close()
    before = _tree_digest(device.state_dir)
    global_state = {k: torch.zeros_like(v) for k, v in trainer.learner.online.state_dict().items()}
    returns = personalized_returns(device, global_state, steps=200, episodes=2, seed=123)
    assert len(returns) == 2
    assert _tree_digest(device.state_dir) == before  # nothing saved, nothing rewritten
    assert all(float(v.abs().sum()) == 0.0 for v in global_state.values())  # input unchanged
    reloaded = LocalTrainer(device.config, seed=device.seed)
    assert reloaded.load(device.state_dir) and reloaded.counters.env_steps == 300
    reloaded.close()


def test_personalisation_is_refused_with_dp():
    with pytest.raises(ConfigError, match="'personalize-steps'"):
        FedqConfig.from_mapping({"personalize-steps": 100, "dp-enabled": True})
