"""End to end through Flower's simulation engine, the way ``fedq-simulate`` runs it: a
real SuperLink, ``flwr run``, Ray-hosted virtual devices. Protects that a federated run
completes and writes every output, that a resumed run continues both the server (rounds,
metrics) and every device (replay buffer, step counters) from disk, and that bad config
fails before any Flower process starts."""

import json
import time

import pytest

from fedq.common.config import FedqConfig
from fedq.common.trainer import LocalTrainer
from fedq.simulations.run import main, ray_start_failed, resolve_run_config

TINY = {"local-steps": 400, "learning-starts": 100, "batch-size": 32, "buffer-size": 2000,
        "hidden-sizes": "16,16", "eval-episodes": 2, "exploration-steps": 800}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _device_steps(run_dir, partition):
    config = FedqConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    trainer = LocalTrainer(config, seed=0)
    assert trainer.load(run_dir / "devices" / f"partition-{partition}")
    trainer.close()
    return trainer.counters.env_steps, len(trainer.buffer)


def _set(mapping):
    return [arg for key, value in mapping.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.slow
def test_two_clients_two_rounds_write_all_outputs_then_resume_continues_devices(
        tmp_path, monkeypatch, capsys):
    """Run as a user would, from a directory holding folders named ``fedq`` and ``common``
    (a clone's parent, a project of the user's), which once broke the final ``flwr ls``
    and could shadow fedq's own packages; the README's resume command then continues the
    same experiment (its config and client count), not one rebuilt from defaults."""
    workdir = tmp_path / "work"
    for name in ("fedq", "common"):
        (workdir / name).mkdir(parents=True)
    monkeypatch.chdir(workdir)
    run_dir = tmp_path / "run"
    assert main(["--clients", "2", "--rounds", "2", "--run-dir", str(run_dir), *_set(TINY),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[fedq] 2 rounds x 2 clients x 400 local steps on CartPole-v1" in out
    assert "[fedq] run summary" in out and "final greedy return" in out

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train"]["clients"] == 2 and r["eval"]["clients"] == 2 for r in rows)
    assert rows[-1]["env-steps-per-client-total"] == 800
    assert json.loads((run_dir / "config.json").read_text())["local-steps"] == 400
    assert (run_dir / "checkpoints" / "round-0002.pt").exists()
    best = rows[-1]["best"]  # the best global model by federated evaluation, kept beside
    assert best["round"] in (1, 2)
    assert best["eval-return-mean"] == max(r["eval"]["eval-return-mean"] for r in rows)
    assert (run_dir / "checkpoints" / "best.pt.sha256").exists()
    assert (run_dir / "learning_curve.png").stat().st_size > 10_000
    assert (run_dir / "client_curves.png").stat().st_size > 10_000
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    client_rows = [json.loads(line) for line in (run_dir / "clients.jsonl").open()]
    assert sorted((r["round"], r["phase"], r["partition-id"]) for r in client_rows) == [
        (n, phase, p) for n in (1, 2) for phase in ("evaluate", "train") for p in (0, 1)]
    assert _device_steps(run_dir, 0) == (800, 800)

    # A new simulation: new SuperLink, new Ray actors, so every device process restarted.
    assert main(["--run-dir", str(run_dir), "--resume", "--rounds", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"[fedq] resuming run {run_dir} at round 3 of 3: 2 clients x 400 local steps" in out
    assert json.loads((run_dir / "config.json").read_text())["local-steps"] == 400
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]  # no round repeated or lost
    assert rows[-1]["env-steps-per-client-total"] == 1200
    for partition in (0, 1):  # devices continued from disk, not from zero
        assert _device_steps(run_dir, partition) == (1200, 1200)


def _started_run(tmp_path, **config):
    """A run directory as fedq-simulate leaves it after starting a 2-client run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = FedqConfig.from_mapping({**TINY, **config, "run-dir": str(run_dir)}).to_mapping()
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "simulation.json").write_text('{"clients": 2}\n')
    return run_dir


@pytest.mark.parametrize(("args", "field", "says"), [
    (["--set", "local-steps=5000"], "local-steps", "was 400, now 5000"),
    (["--set", "learning-rate=0.01"], "learning-rate", "a resumed run keeps its config"),
    (["--clients", "4"], "clients", "started with 2 clients, not 4"),
])
def test_resume_refuses_to_change_the_experiment(tmp_path, capsys, args, field, says):
    run_dir = _started_run(tmp_path)
    before = (run_dir / "config.json").read_text()
    assert main(["--run-dir", str(run_dir), "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert f"config field '{field}'" in err and says in err
    assert (run_dir / "config.json").read_text() == before


def test_resume_keeps_the_saved_config_and_may_extend_the_rounds(tmp_path):
    run_dir = _started_run(tmp_path, **{"num-server-rounds": 2})
    config, run_config = resolve_run_config(
        {"run-dir": str(run_dir), "resume": True, "num-server-rounds": 6}, clients=2)
    assert (config.local_steps, config.hidden_sizes, config.num_server_rounds) == (
        400, (16, 16), 6)
    assert run_config["local-steps"] == 400  # submitted explicitly, not left to defaults


def test_resume_without_a_run_names_the_run_dir(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "config field 'run-dir': nothing to resume" in capsys.readouterr().err
    assert main(["--resume"]) == 2
    assert "--resume needs the --run-dir" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "field"), [
    (["--set", "env-id=NoSuchEnv-v0"], "env-id"),
    (["--set", "env-id=Pendulum-v1"], "env-id"),  # Box action space: not a DQN env
    (["--set", "learning-rate=-0.001"], "learning-rate"),
    (["--clients", "0"], "clients"),
    (["--clients", "2", "--set", "min-available-clients=3"], "min-available-clients"),
    (["--set", "env-kwargs={bad json"], "env-kwargs"),
    (["--set", "num-server-rounds=0"], "num-server-rounds"),
    (["--set", "learning-rte=0.1"], "learning-rte"),
])
def test_bad_config_fails_fast_naming_the_field(tmp_path, capsys, args, field):
    started = time.perf_counter()
    code = main([*args, "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert f"config field '{field}'" in capsys.readouterr().err
    assert time.perf_counter() - started < 5  # no SuperLink, no Ray: nothing started
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["--run-dir", str(run_dir)]) == 2
    assert "config field 'run-dir'" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_ray_start_timeout_is_recognised_in_rays_own_words():
    """fedq-simulate retries (and explains) a run that died because Ray's node did not
    start in the 30 s Ray hard-codes; the text it looks for must be what Ray raises."""
    import inspect

    from ray._private import node

    source = inspect.getsource(node)
    raised = source[source.index('"The current node timed out'):].split(")", 1)[0]
    message = "".join(part.strip().strip('"') for part in raised.splitlines())
    assert ray_start_failed(f"Exception: {message}\n")
    assert not ray_start_failed("ValueError: config field 'seed'")


def test_a_users_own_common_and_server_packages_cannot_shadow_fedq(tmp_path):
    """fedq installs as fedq.common, fedq.client, fedq.server, fedq.simulations: packages
    named common/ or server/ in the working directory (first on sys.path), as a user's own
    project may have, are not what the ServerApp and ClientApp import."""
    import subprocess
    import sys

    for name in ("common", "server", "client"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('the user\\'s own {name} package was imported')\n")
    code = ("import fedq.server.server_app, fedq.client.client_app, fedq.simulations.run; "
            "print(fedq.server.server_app.app, fedq.client.client_app.app)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ServerApp" in done.stdout and "ClientApp" in done.stdout
