"""End to end through Flower's simulation engine, the way ``fedq-simulate`` runs it: a
real SuperLink, ``flwr run``, Ray-hosted virtual devices. Protects that a federated run
completes and writes every output, that a resumed run continues both the server (rounds,
metrics) and every device (replay buffer, step counters) from disk, and that bad config
fails before any Flower process starts."""

import json
import time

import pytest

from common.config import FedqConfig
from common.trainer import LocalTrainer
from simulations.run import main, resolve_run_config, simulate

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


@pytest.mark.slow
def test_two_clients_two_rounds_write_all_outputs_then_resume_continues_devices(tmp_path):
    run_dir = tmp_path / "run"
    _, run_config = resolve_run_config(
        {**TINY, "num-server-rounds": 2, "run-dir": str(run_dir)}, clients=2)
    result = simulate(run_config, clients=2, stream=False, timeout=300)
    assert result.ok, result.output[-3000:]

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train"]["clients"] == 2 and r["eval"]["clients"] == 2 for r in rows)
    assert rows[-1]["env-steps-per-client-total"] == 800
    assert json.loads((run_dir / "config.json").read_text())["local-steps"] == 400
    assert (run_dir / "checkpoints" / "round-0002.pt").exists()
    assert (run_dir / "learning_curve.png").stat().st_size > 10_000
    assert (run_dir / "client_curves.png").stat().st_size > 10_000
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    client_rows = [json.loads(line) for line in (run_dir / "clients.jsonl").open()]
    assert sorted((r["round"], r["phase"], r["partition-id"]) for r in client_rows) == [
        (n, phase, p) for n in (1, 2) for phase in ("evaluate", "train") for p in (0, 1)]
    assert _device_steps(run_dir, 0) == (800, 800)

    # A new simulation: new SuperLink, new Ray actors, so every device process restarted.
    _, resumed = resolve_run_config(
        {**TINY, "num-server-rounds": 3, "run-dir": str(run_dir), "resume": True}, clients=2)
    result = simulate(resumed, clients=2, stream=False, timeout=300)
    assert result.ok, result.output[-3000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]  # no round repeated or lost
    assert rows[-1]["env-steps-per-client-total"] == 1200
    for partition in (0, 1):  # devices continued from disk, not from zero
        assert _device_steps(run_dir, partition) == (1200, 1200)


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


@pytest.mark.slow
def test_sequential_strategy_chains_devices_in_partition_order_in_the_engine(tmp_path):
    """Three devices, one round: partition p starts from a model that already learnt from
    p x 400 env steps, so with the federation clock its epsilon schedule starts there."""
    run_dir = tmp_path / "run"
    _, run_config = resolve_run_config(
        {**TINY, "num-server-rounds": 1, "run-dir": str(run_dir), "strategy": "sequential",
         "exploration-clock": "federation", "exploration-steps": 2000}, clients=3)
    result = simulate(run_config, clients=3, stream=False, timeout=300)
    assert result.ok, result.output[-3000:]
    (row,) = _rows(run_dir)
    assert row["train"]["clients"] == 3 and row["env-steps-federation-total"] == 1200
    assert row["env-steps-per-client-total"] == 400
    trained = {r["partition-id"]: r for r in map(json.loads, (run_dir / "clients.jsonl").open())
               if r["phase"] == "train"}
    for partition, reply in trained.items():
        start = 400 * partition  # the env steps of the devices visited before it
        assert reply["epsilon"] == pytest.approx(1.0 - 0.98 * (start + 400) / 2000)
        assert _device_steps(run_dir, partition) == (400, 400)  # its own steps: 400 each
