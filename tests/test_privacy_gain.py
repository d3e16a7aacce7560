"""The privacy-gain benchmark's cells at a tiny budget: pretraining runs before the cells
that read its weights, each privacy unit gets its rows, and the epsilons are the right
ones (0 without device data, inf without DP, amplified below unamplified)."""

from __future__ import annotations

import json
import math

from fedq.simulations import privacy_gain, private_finetune
from fedq.simulations.harness import run_benchmark
from fedq.simulations.public_pretrain import PUBLIC_PHYSICS_BASE, sample_physics


def test_device_physics_are_fixed_per_index_and_apart_from_the_public_draws() -> None:
    assert private_finetune.device_physics(3) == private_finetune.device_physics(3)
    assert private_finetune.device_physics(3) != private_finetune.device_physics(4)
    devices = {json.dumps(private_finetune.device_physics(i)) for i in range(100)}
    public = {json.dumps(sample_physics(PUBLIC_PHYSICS_BASE, j)) for j in range(10)}
    assert not devices & public


def test_quick_run_reports_both_privacy_units_with_their_epsilons(tmp_path) -> None:
    benchmark = privacy_gain.BENCHMARK
    params = {**benchmark.defaults, **benchmark.quick}
    kinds = [cell.kind.name for cell in benchmark.cells(params)]
    assert kinds[0] == "privacy-gain-pretrain"  # read by every later cell of its seed
    report = run_benchmark(benchmark, quick=True, cache_root=tmp_path / "cache",
                           results_root=tmp_path / "results", log=lambda _: None)
    assert report.missing == 0
    payload = json.loads((report.folder / "results.json").read_text())
    rows = {(r["privacy unit"], r["setting"]): r for r in payload["summary"]}
    assert set(rows) == {("transition", "pretrained only"), ("transition", "no-dp"),
                         ("transition", "noise 1"), ("device", "pretrained only"),
                         ("device", "no-dp"), ("device", "noise 1")}
    assert rows[("transition", "pretrained only")]["epsilon max"] == 0
    assert rows[("transition", "no-dp")]["epsilon max"] is None  # inf: no guarantee
    assert 0 < rows[("transition", "noise 1")]["epsilon max"] < math.inf
    device = rows[("device", "noise 1")]
    assert 0 < device["epsilon max"] < device["epsilon no-amplification"]
    assert (report.folder / benchmark.plot_name).stat().st_size > 0
    assert len(payload["verdicts"]) == 2
