"""The Pi-class emulation (simulations/pi_emulation.py) measures what it says it does.

The measurement itself needs a Docker engine and runs as a benchmark, not in CI. What is
checked here without one: the compose override puts every device on the measured
backend (run config and each node's own config, which is what keeps torch out of a numpy
device's fork server), keeps each node's identity and the file's run settings apart from
the rounds, and isolates the network; and the medians leave round 1 out."""

import pytest
import yaml
from _compose_v1 import assert_compose_v1_accepts

from fedq.simulations import bench, bench_docker
from fedq.simulations.compose_check import pi_override
from fedq.simulations.compose_topology import (
    COMPOSE,
    load_compose,
    node_config,
    submit_overrides,
    supernode_services,
)
from fedq.simulations.harness import BENCHMARKS, HarnessError, resolve_params
from fedq.simulations.pi_emulation import _median_from_2, run_override


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


@pytest.mark.parametrize(("overrides", "message"), [
    ({"backends": "numpy,jax"}, r"backends: unknown \['jax'\]"),
    ({"rounds": 1}, "rounds: at least 2"),
])
def test_bad_parameters_fail_naming_the_parameter(overrides, message):
    bench.load_benchmarks()
    params = resolve_params(BENCHMARKS["pi"], overrides, quick=False)
    with pytest.raises(HarnessError, match=message):
        bench_docker.pi_cells(params)


def test_one_cell_per_backend_each_with_the_pi_limits():
    bench.load_benchmarks()
    cells = bench_docker.pi_cells(resolve_params(BENCHMARKS["pi"], {}, quick=False))
    assert [c.params["backend"] for c in cells] == ["numpy", "torch"]
    assert {(c.params["cpus"], c.params["memory"]) for c in cells} == {(1.0, "512m")}


def test_the_tables_read_the_reports_the_scripts_committed():
    """The harness summaries read the report shapes the Docker runs produce: the committed
    compose report (four checks passed) and the committed Pi emulation (two backends)."""
    import json

    from fedq.simulations.compose_check import COMPOSE_CHECK
    from fedq.simulations.harness import Cell
    from fedq.simulations.pi_emulation import PI_RUN
    from fedq.simulations.results_io import RESULTS_ROOT

    bench.load_benchmarks()
    report = json.loads((RESULTS_ROOT / "compose" / "compose_check.json").read_text())
    params = resolve_params(BENCHMARKS["compose"], {}, quick=False)
    summary = bench_docker.summarise_compose(params, [(Cell(COMPOSE_CHECK, params), report)])
    assert [(row["check"], row["passed"]) for row in summary.rows] == [
        ("complete", True), ("second-up", True), ("node-rejoins", True), ("resume", True)]
    assert summary.text.startswith("**All checks passed**")
    results = json.loads((RESULTS_ROOT / "pi" / "results.json").read_text())["results"]
    params = resolve_params(BENCHMARKS["pi"], {}, quick=False)
    done = [(Cell(PI_RUN, {**params, "backend": b}), r) for b, r in results.items()]
    rows = bench_docker.summarise_pi(params, done).rows
    assert [(row["backend"], row["node"]) for row in rows] == [
        ("numpy", "pi"), ("numpy", "unconstrained"), ("torch", "pi"), ("torch", "unconstrained")]
    assert rows[0]["PSS peak MiB"] > 0
