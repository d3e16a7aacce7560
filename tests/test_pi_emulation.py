"""The Pi-class emulation (simulations/pi_emulation.py) measures what it says it does.

The measurement itself needs a Docker engine and runs as a benchmark, not in CI. What is
checked here without one: the compose override puts every device on the measured
backend (run config and each node's own config, which is what keeps torch out of a numpy
device's fork server), keeps each node's identity and the file's run settings apart from
the rounds, and isolates the network; and the medians leave round 1 out."""

import pytest
import yaml
from _compose_v1 import assert_compose_v1_accepts

from fedq.simulations.compose_check import pi_override
from fedq.simulations.compose_topology import (
    COMPOSE,
    load_compose,
    node_config,
    submit_overrides,
    supernode_services,
)
from fedq.simulations.pi_emulation import _median_from_2, main, run_override


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_override_puts_every_device_on_the_backend_and_keeps_the_files_settings(
        backend, tmp_path):
    path, pi_path = tmp_path / "run.yml", tmp_path / "pi.yml"
    path.write_text(yaml.safe_dump(run_override(backend, 5, 2000, 600), width=1 << 20))
    pi_path.write_text(yaml.safe_dump(pi_override(1.0, "512m")))
    merged, plain = load_compose(COMPOSE, path, pi_path), load_compose(COMPOSE)
    for name, service in supernode_services(merged).items():
        own = node_config(supernode_services(plain)[name])
        assert node_config(service) == {**own, "backend": backend}
    run = submit_overrides(merged)
    assert run == {**submit_overrides(plain), "num-server-rounds": 5, "local-steps": 2000,
                   "backend": backend, "resume": False, "round-timeout": 600,
                   "run-dir": f"/data/runs/pi-{backend}"}
    assert merged["networks"] == {"default": {"internal": True}}
    assert_compose_v1_accepts(path, pi_path)


def test_medians_leave_out_round_one():
    assert _median_from_2({1: 90.0, 2: 3.0, 3: 5.0, 4: 4.0}) == 4.0
    assert _median_from_2({1: 90.0}) is None


def test_bad_arguments_fail_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--backends", "numpy,jax"])
    assert "--backends: unknown ['jax']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rounds", "1"])
    assert "--rounds: at least 2" in capsys.readouterr().err
