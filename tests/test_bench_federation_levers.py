"""The federation-levers probe replays fedq's round loop faithfully enough to compare
levers: one device that gets its own weights back every round is plain local training,
and bad parameters fail naming the parameter before any cell runs."""

import numpy as np
import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer
from fedq.simulations import bench_federation_levers as bench_levers
from fedq.simulations import levers_cell as levers
from fedq.simulations.harness import HarnessError, resolve_params
from fedq.simulations.results_io import markdown_table


def test_one_device_that_keeps_its_target_is_plain_local_training():
    cell = levers.run_cell("fedavg-10-sync", clients=1, seed=3, max_steps=1000)
    trainer = LocalTrainer(FedqConfig(), seed=3)
    expected = []
    for steps in (500, 1000):
        trainer.train(500)
        returns = play_episodes(trainer.learner.policy.act, "CartPole-v1",
                                levers.EVAL_EPISODES, seed=10**6 + 3 + steps)
        expected.append(round(float(np.mean(returns)), 1))
    trainer.close()
    assert cell["steps"] == 1000
    assert cell["curve"] == expected


@pytest.mark.parametrize(("stop_at_goal", "steps"), [(True, 1500), (False, 2000)])
def test_keep_training_goes_on_past_the_goal_and_still_reports_when_it_was_solved(
        stop_at_goal, steps, monkeypatch):
    monkeypatch.setattr(levers, "GOAL", 0.0)  # every evaluation reaches it
    cell = levers.run_cell("fedavg-500", clients=1, seed=0, max_steps=2000,
                           stop_at_goal=stop_at_goal)
    assert cell["first_at_goal"] == 500
    assert cell["solved_at"] == 1500  # the third evaluation in a row at the goal
    assert cell["final_return"] == pytest.approx(cell["curve"][-1], abs=0.05)  # curve: 0.1
    assert cell["best_return"] == pytest.approx(max(cell["curve"]), abs=0.05)
    assert cell["steps"] == steps
    assert len(cell["curve"]) == steps // levers.EVAL_EVERY


@pytest.mark.parametrize(("overrides", "name"), [
    ({"levers": "fedavg-500,fedsgd"}, "levers"),
    ({"clients": "1,four"}, "clients"),
    ({"clients": "0,4"}, "clients"),
    ({"max-steps": 100}, "max-steps"),
    ({"seeds": 0}, "seeds"),
    ({"first-seed": -1}, "first-seed"),
])
def test_bad_parameters_fail_naming_the_parameter_before_any_cell(overrides, name):
    params = resolve_params(bench_levers.BENCHMARK, overrides, quick=False)
    with pytest.raises(HarnessError, match=name):
        bench_levers.cells(params)


def test_all_levers_expand_to_every_lever_for_every_n_and_seed():
    params = resolve_params(bench_levers.BENCHMARK, {}, quick=False)
    cells = bench_levers.cells(params)
    assert len(cells) == len(levers.LEVERS) * 2 * 3  # N = 1, 4; 3 seeds
    assert {c.params["lever"] for c in cells} == set(levers.LEVERS)
    assert all(c.params["stop-at-goal"] for c in cells)


@pytest.mark.parametrize("name", sorted(levers.LEVERS))
def test_every_lever_changes_only_valid_config_keys(name):
    lever = levers.LEVERS[name]
    config = FedqConfig().with_overrides(lever.overrides)  # raises ConfigError naming a bad key
    for key, value in lever.overrides.items():
        assert getattr(config, key.replace("-", "_")) == value


def test_server_step_with_momentum_is_fedavgm_and_without_is_the_exact_mean():
    ones = {"w": torch.ones(2)}
    global_weights = {"w": torch.zeros(2)}
    velocity = {"w": torch.zeros(2)}
    levers.server_step(global_weights, [ones, {"w": torch.full((2,), 3.0)}], 1.0, 0.0, velocity)
    assert torch.equal(global_weights["w"], torch.full((2,), 2.0))  # the mean
    global_weights = {"w": torch.zeros(2)}
    # FedAvgM, beta 0.5: round 1 moves by the mean update 1; round 2's update is 1 again
    # (devices at 2 from 1) and the velocity is 0.5 * 1 + 1 = 1.5
    levers.server_step(global_weights, [ones], 1.0, 0.5, velocity)
    assert torch.equal(global_weights["w"], torch.ones(2))
    levers.server_step(global_weights, [{"w": torch.full((2,), 2.0)}], 1.0, 0.5, velocity)
    assert torch.equal(global_weights["w"], torch.full((2,), 2.5))
    assert torch.equal(velocity["w"], torch.full((2,), 1.5))


def test_a_run_without_one_device_has_no_ratio_rather_than_nan():
    cells = [{"lever": "fedavg-500", "clients": 4, "seed": 0, "solved_at": 500}]
    (row,) = bench_levers.table(cells, max_steps=1000)
    assert row["vs N=1"] is None
    assert "| - |" in markdown_table([row], ["median", "vs N=1"])
