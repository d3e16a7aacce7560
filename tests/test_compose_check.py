"""The real `docker compose up` check (simulations/compose_check.py, the `compose`
benchmark of simulations/bench_docker.py).

The full check needs a Docker engine and takes ~25 min on a loaded 2-core machine
(docs/compose.md), so it runs only where ``docker info`` answers; the default CI starts
no engine and skips it with the reason. The override it runs with is checked here
without an engine: it must keep what the compose file promises (run-dir and resume from
the environment) and cut the containers off from everything but each other."""

import json

import pytest
import yaml
from _compose_v1 import assert_compose_v1_accepts

from fedq.simulations import bench, bench_docker
from fedq.simulations.compose_check import ENGINE_WORK, PI_SERVICE, override, pi_override
from fedq.simulations.compose_topology import (
    COMPOSE,
    ROOT,
    TINY_RUN,
    load_compose,
    submit_overrides,
)
from fedq.simulations.docker_engine import engine_answers, image_requirements
from fedq.simulations.harness import BENCHMARKS, HarnessError, fingerprint, resolve_params

CHECKS = {"complete", "second-up", "node-rejoins", "resume"}


def test_the_docker_cells_keep_their_engine_outside_the_checkout():
    """The engine's data and the base image's root file system are ~275,000 files: inside
    the project, every `flwr run` of the checkout (each fedq-simulate run) walked them
    while bundling the app, 30-80 s a run."""
    assert not ENGINE_WORK.resolve().is_relative_to(ROOT)


def test_override_runs_the_compose_run_short_on_an_internal_network(tmp_path):
    data = override()
    assert data["networks"] == {"default": {"internal": True}}
    pi = pi_override(1.0, "512m")["services"][PI_SERVICE]
    assert (pi["cpus"], pi["mem_limit"], pi["memswap_limit"]) == (1.0, "512m", "512m")
    path, pi_path = tmp_path / "override.yml", tmp_path / "pi.yml"
    path.write_text(yaml.safe_dump(data))
    pi_path.write_text(yaml.safe_dump(pi_override(1.0, "512m")))
    merged = load_compose(COMPOSE, path, pi_path)
    overrides = submit_overrides(merged)
    plain = submit_overrides(load_compose(COMPOSE))
    for key in ("run-dir", "resume", "min-available-clients"):  # the file's own promises
        assert overrides[key] == plain[key], key
    assert overrides["num-server-rounds"] == 3
    assert {k: overrides[k] for k in TINY_RUN} == TINY_RUN
    assert_compose_v1_accepts(path, pi_path)


def test_image_requirements_are_the_dockerfiles():
    """The wheels downloaded for the offline build are what the Dockerfile installs."""
    requirements = image_requirements()
    assert "flwr==1.42.0" in requirements and not any("[simulation]" in r
                                                      for r in requirements)
    assert "torch==2.13.0+cpu; sys_platform == 'linux'" in requirements
    assert "opacus==1.6.0" in requirements and "tensorboardX==2.6.5" in requirements
    assert not any(r.startswith("fedq[") for r in requirements)
    assert any(r.startswith("setuptools") for r in requirements)  # `pip install /src`
    dockerfile = (ROOT / "Dockerfile").read_text()  # the same selection of extras
    assert "['optional-dependencies']['torch'] + p['optional-dependencies']['server']" in \
        dockerfile


def test_fault_run_needs_enough_rounds_to_kill_twice():
    bench.load_benchmarks()
    params = resolve_params(BENCHMARKS["compose"], {"fault-rounds": 3}, quick=False)
    with pytest.raises(HarnessError, match="fault-rounds: at least 5"):
        bench_docker.compose_cells(params)
    # without the fault checks the fault run's rounds do not matter
    bench_docker.compose_cells({**params, "skip-faults": True})


def test_editing_the_image_or_topology_files_runs_the_docker_cells_again(monkeypatch):
    """The harness hashes Python sources; the image and the compose topology are made
    from the Dockerfile, docker-compose.yml and pyproject.toml, so their digest is in
    each Docker cell's parameters."""
    bench.load_benchmarks()
    params = resolve_params(BENCHMARKS["compose"], {}, quick=False)
    (before,) = bench_docker.compose_cells(params)
    monkeypatch.setattr(bench_docker, "IMAGE_FILES", ("Dockerfile", "docker-compose.yml"))
    (after,) = bench_docker.compose_cells(params)
    assert fingerprint(before) != fingerprint(after)


@pytest.mark.slow
@pytest.mark.skipif(not engine_answers(),
                    reason="no Docker engine answers `docker info`: the compose check needs "
                    "one (as root, `python -m fedq.simulations.bench compose` installs and "
                    "starts one itself; see docs/compose.md)")
def test_compose_up_completes_survives_kills_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the harness cache; the engine's work dir is the checkout's
    assert bench.main(["compose", "--results-root", str(tmp_path / "results")]) == 0
    record = json.loads((tmp_path / "results" / "compose" / "results.json").read_text())
    report = record["report"]
    failed = {name: c for name, c in report["checks"].items() if not c.get("passed")}
    assert report["passed"], json.dumps({"error": report.get("error"), "failed": failed},
                                        indent=1)
    assert set(report["checks"]) == CHECKS
    assert report["checks"]["resume"]["rounds"] == [1, 2, 3, 4, 5]
    assert report["pi-class"]["memory"]["working-set-peak-mib"] > 0


@pytest.mark.parametrize("name", ["compose", "pi"])
def test_a_machine_without_an_engine_caches_no_docker_result(tmp_path, monkeypatch, name):
    """No engine (or no image) says nothing about fedq: the cell raises, naming why, and
    leaves no cache entry, so the next run on a machine with an engine runs it (a cached
    error used to read as a finished result)."""
    import contextlib

    from fedq.simulations import compose_check, pi_emulation
    from fedq.simulations.docker_engine import EngineError
    from fedq.simulations.harness import run_benchmark

    @contextlib.contextmanager
    def no_engine(_work):
        raise EngineError("no Docker engine runs and installing one needs root")
        yield

    for module in (compose_check, pi_emulation):
        monkeypatch.setattr(module, "docker_engine", no_engine)
    monkeypatch.setattr(compose_check, "ENGINE_WORK", tmp_path / "engine")
    monkeypatch.setattr(pi_emulation, "ENGINE_WORK", tmp_path / "engine")
    bench.load_benchmarks()
    with pytest.raises(HarnessError, match=r"nothing measured|no check ran") as err:
        run_benchmark(BENCHMARKS[name], cache_root=tmp_path / "cache",
                      results_root=tmp_path / "results", log=lambda _line: None)
    assert "installing one needs root" in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.json"))
    assert not (tmp_path / "results").exists()
