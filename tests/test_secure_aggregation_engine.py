"""SecAgg+ in Flower's simulation engine (real SuperLink, Ray-backed virtual SuperNodes),
through a probed copy of the app (tests/_probe_app.py): the ServerApp's grid writes a
summary of every reply the server receives, and a test-only train mod inside SecAgg+
saves what each device trained, which the server must never see.

- without DP: the new global model is FedAvg of the devices' updates within one
  quantisation level, and no reply the server received carries an array;
- distributed DP with a device lost mid-protocol: the released sum carries noise of std
  sigma C sqrt(k / n) for the k = 3 of n = 4 devices whose shares are in it, and the
  central epsilon is accounted with that multiplier.
"""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _probe_app import probe_app
from _uniform import looks_uniform

from fedq.common.privacy import epsilon_of
from fedq.server.run_directory import RunDirectory
from fedq.simulations.flower_runtime import simulation_superlink, submit_run
from fedq.simulations.run import APP_DIR, resolve_run_config

pytestmark = pytest.mark.slow

TINY = {"hidden-sizes": "16,16", "buffer-size": 400, "batch-size": 16, "learning-starts": 40,
        "target-update-interval": 40, "exploration-steps": 100, "local-steps": 100,
        "eval-episodes": 1, "num-server-rounds": 1, "round-timeout": 120,
        "validate-updates": False, "secure-aggregation": True}
LEVEL = 2 * 8.0 / 4194304  # one quantisation level at the default clipping range


def _run(tmp_path: Path, clients: int, drop: dict[int, bool] | None = None,
         **overrides) -> tuple[dict, Path]:
    run_dir, out = tmp_path / "run", tmp_path / "probe"
    _, run_config = resolve_run_config({**TINY, "min-available-clients": clients,
                                        "run-dir": str(run_dir), **overrides}, clients=clients)
    with tempfile.TemporaryDirectory(prefix="fedq-secagg-") as workdir, \
            simulation_superlink(Path(workdir)) as link:
        result = submit_run(link, probe_app(APP_DIR, Path(workdir), out, drop),
                            run_config=run_config, num_supernodes=clients,
                            federation_config={"client-resources-num-cpus": 1},
                            stream=False, timeout=300, log_path=run_dir / "flower.log")
    assert result.ok, result.output[-3000:]
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return row, out


def _update(out: Path, partition: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(global before, the device's update, its weight), flattened in tensor order."""
    saved = np.load(out / f"plain-{partition}.npz")
    names = [k[len("global."):] for k in saved.files if k.startswith("global.")]
    start = np.concatenate([saved["global." + n].astype(np.float64).ravel() for n in names])
    trained = np.concatenate([saved["trained." + n].astype(np.float64).ravel() for n in names])
    return start, trained - start, float(saved["weight"])


def _released_update(run_dir: Path, start: np.ndarray, out: Path) -> np.ndarray:
    names = [k[len("global."):] for k in np.load(out / "plain-0.npz").files
             if k.startswith("global.")]
    state = RunDirectory(run_dir).load_checkpoint(1)["state_dict"]
    return np.concatenate([state[n].numpy().astype(np.float64).ravel() for n in names]) - start


def _server_received(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "server-received.jsonl").read_text().splitlines()]


def test_secure_fedavg_in_the_engine_equals_fedavg_and_the_server_sees_no_update(tmp_path):
    row, out = _run(tmp_path, 3)
    assert row["train"]["clients"] == 3 and row["train"]["secagg-masked-devices"] == 3
    start, _, _ = _update(out, 0)
    updates = [_update(out, p) for p in range(3)]
    fedavg = sum(w * u for _, u, w in updates) / sum(w for _, _, w in updates)
    released = _released_update(tmp_path / "run", start, out)
    assert np.max(np.abs(released - fedavg)) <= LEVEL + 1e-6
    assert np.max(np.abs(fedavg)) > 100 * LEVEL
    received = _server_received(out)
    assert received and all(r["array-elements"] == 0 for r in received)
    masked = [m for r in received for m in r["masked"]]
    assert len({r["error"] for r in received}) == 1  # no device failed
    # one masked vector per device (its weight and 386 coordinates), uniform mod 2**32
    assert [size for _, _, size in masked] == [1 + 386] * 3
    assert all(looks_uniform(mean, std, size) for mean, std, size in masked), masked


def test_distributed_dp_in_the_engine_with_a_device_lost_mid_protocol(tmp_path):
    sigma, clip = 100.0, 0.01
    row, out = _run(tmp_path, 4, drop={3: True}, **{
        "central-dp": "distributed", "central-dp-clients": 4,
        "central-dp-noise-multiplier": sigma, "central-dp-clip-norm": clip})
    assert row["train"]["secagg-masked-devices"] == 3
    assert any(f["phase"] == "train" and f["partition-id"] == 3 for f in row["device-failures"])
    start, _, _ = _update(out, 0)
    clipped = [u * min(1.0, clip / np.linalg.norm(u))
               for _, u, _ in (_update(out, p) for p in range(3))]
    noise = _released_update(tmp_path / "run", start, out) * 3 - sum(clipped)
    assert noise.std() == pytest.approx(sigma * clip * math.sqrt(3 / 4), rel=0.15)
    report = row["central-dp"]
    assert report["released-noise-multipliers"] == pytest.approx([sigma * math.sqrt(3 / 4)])
    assert report["epsilon"] == pytest.approx(epsilon_of(
        "rdp", report["delta"], ((sigma * math.sqrt(3 / 4), 1.0, 1),)))
    assert all(r["array-elements"] == 0 for r in _server_received(out))
