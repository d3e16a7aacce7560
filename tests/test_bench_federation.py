"""The federation benchmark's round-overhead share: the time a round spends outside local
training. FedAvg's devices train side by side (the slowest one, or the summed training
spread over the cores, is the training time); sequential devices train one after another,
so their training times add up."""

import pytest

from fedq.simulations.bench_federation import overhead_shares


def _row(train_phase, round_seconds, seconds):
    return {"train-phase-seconds": train_phase, "round-seconds": round_seconds,
            "train": {"train-seconds-max": max(seconds), "train-seconds-sum": sum(seconds)}}


def test_overhead_of_parallel_and_sequential_rounds():
    first = _row(60.0, 70.0, [1.0, 1.0])  # round 1 (process start-up) is left out
    parallel = [first, _row(7.5, 15.0, [4.0, 3.0, 4.5, 2.0])]  # 4 devices, 2 cores: 6.75 s
    assert overhead_shares(parallel, clients=4, cores=2) == pytest.approx((0.1, 0.55))
    chain = [first, _row(10.0, 12.0, [2.0, 2.5, 2.5, 2.0])]  # one after another: 9 s
    assert overhead_shares(chain, clients=4, cores=2, sequential=True) == pytest.approx(
        (0.1, 0.25))


def test_curves_plot_every_run(tmp_path):
    from fedq.simulations.bench_federation import plot
    runs = [{"strategy": s, "clients": n, "seed": seed,
             "curve": [[2500, 20.0], [5000, None], [7500, 480.0]]}
            for s in ("sequential", "fedavg") for n in (1, 4) for seed in (0, 1)]
    plot(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _result(returns, round_seconds=2.0):
    rows = [{"round": i + 1, "env-steps-per-client-total": 2500.0 * (i + 1),
             "round-seconds": round_seconds, "train-phase-seconds": 1.0,
             "train": {"train-seconds-max": 0.5, "train-seconds-sum": 0.5},
             "eval": {} if r is None else {"eval-return-mean": r}}
            for i, r in enumerate(returns)]
    return {"rows": rows, "ok": True, "status": "finished:completed", "cores": 2}


def test_a_run_is_solved_at_its_third_round_in_a_row_at_the_goal_and_keeps_final_and_best():
    """One round at the goal is not solved; the wall time to solved counts every round
    up to and including the solving one (issue 20's criterion, as learning's)."""
    from fedq.simulations.bench_federation import run_summary, table_row

    touched = run_summary("fedavg", 4, 0, _result([100.0, 480.0, 120.0, 130.0]))
    assert (touched["steps-per-client"], touched["final-return"],
            touched["best-return"]) == (None, 130.0, 480.0)
    solved = run_summary("fedavg", 4, 1, _result([100.0, 480.0, 476.0, None, 500.0, 300.0]))
    assert solved["steps-per-client"] == 12_500.0  # rounds 2, 3, 5 (4 was not evaluated)
    assert solved["seconds-to-solved"] == 10.0  # five rounds of 2 s
    assert solved["curve"][3] == [10_000.0, None]
    row = table_row("fedavg", 4, [touched, solved])
    assert row["solved"] == "1/2" and row["per seed"] == "-, 12,500"
    assert row["total env steps (median)"] == 50_000.0


def test_federated_runs_count_as_solved_at_the_third_round_in_a_row_at_the_goal(tmp_path):
    """A federated run that touches the goal once and falls back is not solved; its
    final and best return say what happened (issue 20's honest criterion)."""
    import json

    from fedq.simulations.pays_cells import federated_curve

    returns = [100.0, 480.0, 120.0, 476.0, 500.0, None, 490.0, 300.0]
    rows = [{"round": i + 1, "env-steps-per-client-total": 2500.0 * (i + 1),
             "eval": {} if r is None else {"eval-return-mean": r}}
            for i, r in enumerate(returns)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = federated_curve(tmp_path, "CartPole-v1")
    # rounds 4, 5 and 7 in a row among the evaluated ones (round 6 had no evaluation)
    assert summary == {"goal": 475.0, "solved-at": 17500.0, "final-return": 300.0,
                       "best-return": 500.0}


def test_federation_pays_runs_the_independent_agents_once_at_the_largest_n():
    """Clients 0..3 of N = 8 are the N = 4 clients, so one independent cell per scenario and
    seed serves both sizes (N = 4 reads its first 4 clients); federated and centralised
    run per N."""
    from fedq.simulations import bench_federation_pays as pays
    from fedq.simulations.harness import resolve_params

    params = resolve_params(pays.BENCHMARK, {"scenarios": "hetero_cartpole", "seeds": 1},
                            quick=False)
    cells = pays.cells(params)
    assert sorted((c.params["method"], c.params["clients"]) for c in cells) == [
        ("centralised", 4), ("centralised", 8), ("federated", 4), ("federated", 8),
        ("independent", 8)]
    assert all(len(c.params["scenario-sha"]) == 12 for c in cells)
    fake = {"federated": {"federated": [1.0] * 4, "personalised": [2.0] * 4,
                          "curve": {"solved-at": None, "final-return": 3.0,
                                    "best-return": 4.0}},
            "centralised": {"centralised": [5.0] * 4},
            "independent": {"independent": [float(k) for k in range(8)],
                            "independent-longer": [10.0 + k for k in range(8)]}}
    results = pays.collect(params, [(c, fake[c.params["method"]]) for c in cells])
    assert results[("hetero_cartpole", 4, 0)]["independent"] == [0.0, 1.0, 2.0, 3.0]
    assert results[("hetero_cartpole", 8, 0)]["independent-longer"][-1] == 17.0
    worst = {r["method"]: r["worst-client return"]
             for r in pays.method_table(results, params) if r["N"] == 4}
    assert worst == {"federated": 1.0, "personalised": 2.0, "independent": 0.0,
                     "independent-longer": 10.0, "centralised": 5.0}


def test_federation_pays_refuses_an_unknown_scenario_naming_it():
    from fedq.simulations import bench_federation_pays as pays
    from fedq.simulations.harness import HarnessError, resolve_params

    params = resolve_params(pays.BENCHMARK, {"scenarios": "hetero_cartpol"}, quick=False)
    with pytest.raises(HarnessError, match=r"scenarios: unknown.*hetero_cartpol"):
        pays.cells(params)


def test_the_best_model_is_replayed_from_best_pt_not_from_the_latest_round(tmp_path):
    """Issue 20: the model a run hands over is checkpoints/best.pt (fedq-export's default),
    so the federation benchmarks score it on fresh episodes: a hand-made balancing policy
    in best.pt scores far above the push-left policy of the latest round, and a run
    without best.pt has no score."""
    import json
    import statistics

    import torch

    from fedq.common.config import FedqConfig
    from fedq.common.trainer import LocalTrainer
    from fedq.simulations.federated_cell import SCORE_SEED, best_model_score

    config = FedqConfig.from_mapping({"hidden-sizes": "2"})
    (tmp_path / "config.json").write_text(json.dumps(config.to_mapping()))
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    assert best_model_score(tmp_path) != best_model_score(tmp_path)  # NaN: no best.pt
    # Q(push right) - Q(push left) = angle + angular velocity: push towards the fall
    lean = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]])
    balancing = {"0.weight": lean, "0.bias": torch.zeros(2),
                 "2.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "2.bias": torch.zeros(2)}
    pushing_left = {**balancing, "2.weight": torch.zeros(2, 2),
                    "2.bias": torch.tensor([1.0, 0.0])}
    torch.save({"round": 7, "state_dict": balancing}, checkpoints / "best.pt")
    torch.save({"round": 9, "state_dict": pushing_left}, checkpoints / "round-0009.pt")

    def played(state: dict) -> float:
        trainer = LocalTrainer(config, seed=SCORE_SEED)
        trainer.learner.load_online(state)
        returns = trainer.evaluate(30, seed=SCORE_SEED)
        trainer.close()
        return statistics.fmean(returns)

    assert best_model_score(tmp_path) == played(balancing)
    assert best_model_score(tmp_path) > 5 * played(pushing_left)
