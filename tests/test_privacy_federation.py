"""Privacy at the federation level, each through a real Flower simulation (SuperLink,
``flwr run``, Ray-hosted devices):

- a device-side DP run whose devices run out of budget: the server logs each declined
  device, goes on with the others, keeps the global model when every device declines,
  and its ``privacy.jsonl`` lets Opacus's accountant recompute every reported epsilon;
- a message audit (client/message_audit.py, the outermost Flower mod) of that DP run and
  of a non-DP run: only the Q-network's weights and scalar metrics leave a device;
- Flower's central DP with client-side and server-side fixed clipping: the clipping
  happens where it should and the noise on the average has the configured size.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedq.common.config import FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.privacy import PRIVACY_BUDGET_ERROR_CODE, extend
from fedq.common.trainer import LocalTrainer
from fedq.server.privacy_log import read_privacy_log
from fedq.simulations.run import resolve_run_config, simulate

TINY = {"local-steps": 300, "learning-starts": 100, "batch-size": 16, "buffer-size": 600,
        "hidden-sizes": "16,16", "eval-episodes": 1, "exploration-steps": 500}
MAX_METRIC_LIST = 64  # accountant segments of one round: a few, never a data array


def _run(tmp_path: Path, clients: int, **overrides) -> tuple[Path, Path]:
    run_dir, audit_dir = tmp_path / "run", tmp_path / "audit"
    _, run_config = resolve_run_config(
        {**TINY, **overrides, "min-available-clients": clients, "run-dir": str(run_dir),
         "message-audit-dir": str(audit_dir)}, clients=clients)
    result = simulate(run_config, clients=clients, stream=False, timeout=300)
    assert result.ok, result.output[-3000:]
    return run_dir, audit_dir


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"round-{server_round:04d}.pt"
    return torch.load(path, weights_only=True)["state_dict"]


def _initial(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global model the server starts from (server_app.initial_model: seeded)."""
    config = FedqConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    torch.manual_seed(config.seed)
    return QNetwork(4, 2, config.hidden_sizes).state_dict()


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().square().sum()) for k in a))


def _cumulative_epsilons(rounds: int) -> list[float]:
    """A TINY DP device's lifetime epsilon after each of its first ``rounds`` rounds."""
    trainer = LocalTrainer(FedqConfig.from_mapping({**TINY, "dp-enabled": True}), seed=0)
    planned = trainer.planned_update_buffer_lengths(rounds * TINY["local-steps"])
    rates = trainer.privacy.sample_rates(planned)
    noise = trainer.privacy.noise_multiplier
    return [trainer.privacy.epsilon(extend([], noise, rates[:len(
        trainer.planned_update_buffer_lengths(k * TINY["local-steps"]))]))
            for k in range(1, rounds + 1)]


def _audited(audit_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(audit_dir.glob("*.json"))]


def _assert_only_weights_and_scalars(messages: list[dict]) -> None:
    """Every train reply: the Q-network's arrays (names and shapes of its state dict,
    packed as one flat float32 array with its layout: common/flat_wire.py) and one
    MetricRecord (two in a fused round); every evaluate reply: one MetricRecord;
    metrics are scalars or short lists of scalars; an error carries only its code and
    reason."""
    expected = {k: list(v.shape) for k, v in QNetwork(4, 2, (16, 16)).state_dict().items()}
    for message in messages:
        if message["error"] is not None:
            assert message["records"] == {} and set(message["error"]) == {"code", "reason"}
            continue
        records = message["records"]
        kinds = {name: r["kind"] for name, r in records.items()}
        if message["message-type"] == "train":  # a fused reply also carries its
            # evaluation of the model it received (server/round_protocol.py)
            layout = {"fedq.flat-layout": "flat-layout"}
            assert kinds in ({"arrays": "arrays", "metrics": "metrics", **layout},
                             {"arrays": "arrays", "metrics": "metrics", "evaluation": "metrics",
                              **layout})
            arrays = records["arrays"]["arrays"]
            assert {k: a["shape"] for k, a in arrays.items()} == expected
            assert {a["dtype"] for a in arrays.values()} == {"float32"}
            size = sum(math.prod(shape) for shape in expected.values())
            assert records["arrays"]["packed-as"] == {"flat": {"shape": [size],
                                                               "dtype": "float32"}}
        else:
            assert message["message-type"] == "evaluate"
            assert kinds == {"metrics": "metrics"}
        scalars = [(k, v) for name in ("metrics", "evaluation") if name in records
                   for k, v in records[name]["metrics"].items()]
        for key, value in scalars:
            if isinstance(value, list):
                assert len(value) <= MAX_METRIC_LIST, key
                assert all(isinstance(v, int | float) for v in value), key
            else:
                assert isinstance(value, int | float), key


@pytest.mark.slow
def test_devices_out_of_budget_decline_and_the_run_carries_on(tmp_path):
    e1, e2, e3 = _cumulative_epsilons(3)
    # partition 0 can afford one round, partition 1 two; round 3 has no one to train
    targets = {"0": {"dp-target-epsilon": (e1 + e2) / 2},
               "1": {"dp-target-epsilon": (e2 + e3) / 2}}
    run_dir, audit_dir = _run(tmp_path, clients=2, **{
        "num-server-rounds": 3, "dp-enabled": True, "client-overrides": json.dumps(targets)})

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["privacy"]["declined"] for r in rows] == [0, 1, 2]
    assert [r["train"]["clients"] for r in rows] == [2, 1, 0]
    assert all(r["eval"]["clients"] == 2 for r in rows)  # declining devices still evaluate
    assert rows[0]["train"]["dp-epsilon-max"] == pytest.approx(e1, rel=1e-9)
    assert rows[1]["train"]["dp-epsilon-max"] == pytest.approx(e2, rel=1e-9)
    assert _distance(_checkpoint(run_dir, 3), _checkpoint(run_dir, 2)) == 0.0  # model kept
    assert _distance(_checkpoint(run_dir, 2), _checkpoint(run_dir, 1)) > 0.0

    log = read_privacy_log(run_dir)
    trained = [r for r in log if r["status"] == "trained"]
    declined = [r for r in log if r["status"] == "declined"]
    assert sorted((r["round"], r["partition-id"]) for r in trained) == [(1, 0), (1, 1), (2, 1)]
    assert sorted(r["round"] for r in declined) == [2, 3, 3]
    assert all("dp-target-epsilon" in r["reason"] for r in declined)
    assert rows[1]["privacy"]["declined-nodes"] == [r["node-id"] for r in declined
                                                    if r["round"] == 2]
    flower_log = (run_dir / "flower.log").read_text()
    assert flower_log.count("declined to train: privacy budget") >= 3  # WARNING per device

    for partition in (0, 1):  # Opacus recomputes every epsilon from the logged segments
        history = []
        for row in sorted((r for r in trained if r["partition-id"] == partition),
                          key=lambda r: r["round"]):
            history += list(zip(row["dp-round-noise-multipliers"], row["dp-round-sample-rates"],
                                row["dp-round-steps"], strict=True))
            accountant = RDPAccountant()
            accountant.history = list(history)
            assert row["dp-epsilon"] == pytest.approx(
                accountant.get_epsilon(row["dp-delta"]), rel=1e-9)
            assert row["dp-steps-total"] == sum(k for _, _, k in history)

    messages = _audited(audit_dir)
    # fused rounds (server/round_protocol.py): per device 3 train replies (rounds 2 and 3
    # also carry the previous model's evaluation) and the last model's evaluate reply; a
    # declining device's error reply carries no evaluation, so each of the 3 declines is
    # followed by the evaluate message it would have had
    assert len(messages) == 2 * (3 + 1) + 3
    errors = [m for m in messages if m["error"] is not None]
    assert len(errors) == 3 and {m["error"]["code"] for m in errors} == {
        PRIVACY_BUDGET_ERROR_CODE}
    _assert_only_weights_and_scalars(messages)


@pytest.mark.slow
def test_central_dp_with_client_side_clipping_and_a_non_private_audit(tmp_path):
    clip, noise, clients = 0.01, 1.0, 2
    run_dir, audit_dir = _run(tmp_path, clients=clients, **{
        "num-server-rounds": 1, "central-dp": "client-fixed", "central-dp-clip-norm": clip,
        "central-dp-noise-multiplier": noise, "central-dp-clients": clients})

    (row,) = _rows(run_dir)
    norms = row["updates"]["update-norms"]  # measured by the server on what it received
    assert len(norms) == clients and max(norms.values()) <= clip * (1 + 1e-4)
    _assert_noise_on_the_average(run_dir, clip, noise, clients)
    messages = _audited(audit_dir)
    assert len(messages) == 2 * clients and all(m["error"] is None for m in messages)
    assert {m["records"]["metrics"]["metrics"]["dp-enabled"] for m in messages
            if m["message-type"] == "train"} == {0}
    _assert_only_weights_and_scalars(messages)


@pytest.mark.slow
def test_central_dp_with_server_side_clipping(tmp_path):
    clip, noise = 0.01, 1.0
    run_dir, _ = _run(tmp_path, clients=1, **{
        "num-server-rounds": 1, "central-dp": "server-fixed", "central-dp-clip-norm": clip,
        "central-dp-noise-multiplier": noise, "central-dp-clients": 1})

    (row,) = _rows(run_dir)
    (raw_norm,) = row["updates"]["update-norms"].values()
    assert raw_norm > 10 * clip  # the device sent its raw update; the server clipped it
    _assert_noise_on_the_average(run_dir, clip, noise, 1)


def _assert_noise_on_the_average(run_dir: Path, clip: float, noise: float,
                                 clients: int) -> None:
    """The global model moved by (average of updates clipped to ``clip``) + Gaussian
    noise of std ``noise * clip / clients`` per weight, as Flower's wrappers promise."""
    step = {k: (v - _initial(run_dir)[k]).numpy() for k, v in _checkpoint(run_dir, 1).items()}
    flat = np.concatenate([v.ravel() for v in step.values()])
    std = noise * clip / clients
    assert np.linalg.norm(flat) > 3 * clip  # noise dominates a clipped average
    assert flat.std() == pytest.approx(std, rel=0.15)  # 386 weights: ~4 % sampling error
    assert "central DP noise with" in (run_dir / "flower.log").read_text()
    # the central (epsilon, delta) of the one released round, recomputed with Opacus
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=noise, sample_rate=1.0)
    (row,) = _rows(run_dir)
    assert row["central-dp"]["released-rounds"] == 1
    assert row["central-dp"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
