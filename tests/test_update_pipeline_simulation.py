"""One real Flower simulation through the whole update path: devices send int8 deltas
(one of them, a simulated attacker the simulation layer adds, NaN), the server
reconstructs them, rejects the NaN one by node, aggregates the rest with a robust
strategy, and records the rejection and the bytes each device sent in metrics.jsonl;
devices keep their error-feedback residual on disk."""

import json

import pytest

from fedq.simulations.attacks import Attack
from fedq.simulations.run import resolve_run_config, simulate

TINY = {"local-steps": 300, "learning-starts": 100, "batch-size": 32, "buffer-size": 2000,
        "hidden-sizes": "16,16", "eval-episodes": 1, "exploration-steps": 600,
        "min-available-clients": 3}


@pytest.mark.slow
def test_int8_updates_with_a_nan_attacker_under_fedmedian(tmp_path):
    run_dir = tmp_path / "run"
    _, run_config = resolve_run_config(
        {**TINY, "num-server-rounds": 1, "run-dir": str(run_dir), "strategy": "fedmedian",
         "update-compression": "int8"}, clients=3)
    result = simulate(run_config, clients=3, stream=False, timeout=300,
                      attack=Attack("nan", (2,)))
    assert result.ok, result.output[-3000:]

    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = row["updates"]
    assert updates["rejected"] == 1
    (reason,) = updates["rejected-reasons"].values()
    assert "contains NaN or Inf" in reason
    assert row["train"]["clients"] == 2 and row["eval"]["clients"] == 3
    sizes = set(updates["upload-bytes-per-client"].values())
    assert len(updates["upload-bytes-per-client"]) == 3 and len(sizes) == 1
    assert sizes.pop() < 386 * 4  # 386 float32 weights in a 4-16-16-2 network
    for partition in range(3):
        generation = (run_dir / "devices" / f"partition-{partition}" / "CURRENT").read_text()
        assert (run_dir / "devices" / f"partition-{partition}" / generation
                / "update_residual.npz").exists()
