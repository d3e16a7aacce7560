"""The privacy_pretrain_device benchmark at a tiny budget: the server noise planned before
running lands the device-level epsilon at the target (and the no-amplification bound is
larger), the population contains privacy_pretrain's 4 device physics, and the evaluation
is privacy_pretrain's (the same net scores the same on both)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedq.common.trainer import LocalTrainer
from fedq.simulations import privacy_pretrain, privacy_pretrain_device
from fedq.simulations.device_finetune import (
    dp_fedavg,
    federation_epsilon,
    noise_for_federation,
    population_physics,
)
from fedq.simulations.harness import run_benchmark
from fedq.simulations.pretrain_finetune import federated_finetune
from fedq.simulations.public_pretrain import run_config


def test_population_holds_the_four_devices_and_draws_near_them() -> None:
    params = privacy_pretrain_device.BENCHMARK.defaults
    population = population_physics(params)
    anchors = json.loads(params["physics"])
    assert len(population) == params["devices"]
    assert population[:4] == anchors
    for i, physics in enumerate(population):
        for k, v in physics.items():
            assert 0.9 * anchors[i % 4][k] - 1e-3 <= v <= 1.1 * anchors[i % 4][k] + 1e-3
    assert population == population_physics(params)  # fixed: the same population each call


def test_planned_noise_reaches_the_target_and_no_amplification_costs_more() -> None:
    noise = noise_for_federation(8.0, 0.1, 24, 1e-5)
    assert 7.9 < federation_epsilon(noise, 0.1, 24, 1e-5) <= 8.0
    assert federation_epsilon(noise, 1.0, 24, 1e-5) > 30.0
    with pytest.raises(ValueError, match="epsilons"):
        noise_for_federation(0.0, 0.1, 24, 1e-5)


def test_scored_like_privacy_pretrain_from_the_same_net() -> None:
    """Same net, same 4 physics, same episodes: the pretrained-only returns agree."""
    params = {**privacy_pretrain_device.BENCHMARK.defaults,
              **privacy_pretrain_device.BENCHMARK.quick, "seed": 0, "noise": None}
    start = {k: v.copy() for k, v in
             LocalTrainer(run_config(params, seed=0), seed=0).learner.online_arrays().items()}
    ours = dp_fedavg(params, start)
    theirs = federated_finetune({**privacy_pretrain.BENCHMARK.defaults,
                                 **privacy_pretrain.BENCHMARK.quick, "seed": 0,
                                 "noise": None}, start)
    assert ours["pretrained-per-device"] == theirs["pretrained-per-device"]
    assert len(ours["curve"]) == params["rounds"]
    assert ours["sampled-per-round"] and np.isinf(ours["epsilons"]).all()


def test_quick_run_reports_both_epsilons_and_plots(tmp_path) -> None:
    benchmark = privacy_pretrain_device.BENCHMARK
    report = run_benchmark(benchmark, quick=True, cache_root=tmp_path / "cache",
                           results_root=tmp_path / "results", log=lambda _: None)
    assert report.missing == 0
    payload = json.loads((report.folder / "results.json").read_text())
    rows = {r["setting"]: r for r in payload["summary"]}
    assert list(rows) == ["pretrained only", "no-dp FedAvg", "DP-FedAvg epsilon 8"]
    dp = rows["DP-FedAvg epsilon 8"]
    assert 7.0 < dp["epsilon max"] <= 8.0
    assert dp["epsilon no-amplification"] > dp["epsilon max"]
    assert "identical across a seed's cells: yes" in (report.folder / "results.md").read_text()
    assert (report.folder / benchmark.plot_name).stat().st_size > 0
