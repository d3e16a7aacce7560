"""The learning benchmark on the harness (simulations/bench_learning.py): a tiny real
CartPole cell runs end to end through ``bench learning --quick``; "solved" is 3 greedy
evaluations in a row at the goal, never one lucky one; too few evaluation episodes and
unknown envs are refused; every cell records max |Q| and leaves its curve so far."""

import json

from fedq.simulations import bench
from fedq.simulations.bench_learning import BENCHMARK
from fedq.simulations.harness import resolve_params
from fedq.simulations.results_io import curve_summary


def test_bench_learning_quick_trains_and_evaluates_one_real_cartpole_seed(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["learning", "--quick"]) == 0
    folder = tmp_path / "runs" / "harness" / "quick" / "learning"
    record = json.loads((folder / "results.json").read_text())
    assert record["command"] == "python -m fedq.simulations.bench learning --quick --workers 1"
    assert {"python", "torch", "flwr", "cpu"} <= set(record["environment"])
    (run,) = record["runs"]
    assert run["backend"] == "torch"  # fedq's default learner: the results describe it
    assert [steps for steps, _ in run["curve"]] == [500, 1000, 1500]
    assert run["final-return"] == run["curve"][-1][1]
    assert run["best-return"] == max(value for _, value in run["curve"])
    # max |Q| per evaluation, and the curve so far left in the cell's scratch folder
    assert [steps for steps, _ in run["max-q"]] == [500, 1000, 1500]
    assert all(0 < q < 1e4 for _, q in run["max-q"])
    (progress,) = (tmp_path / "runs").rglob("learning-run/*.work/progress.json")
    assert json.loads(progress.read_text())["curve"] == run["curve"]
    (row,) = record["summary"]
    assert (row["env"], row["seeds"], row["budget"]) == ("CartPole-v1", 1, 1500)
    markdown = (folder / "results.md").read_text()
    assert "Per seed:" in markdown and "![learning](curves.png)" in markdown
    assert (folder / "curves.png").stat().st_size > 1000


def _done(curves):
    """The benchmark's own CartPole cells, each paired with a given learning curve."""
    params = resolve_params(BENCHMARK, {"envs": "CartPole-v1", "seeds": len(curves)}, False)
    return params, [(cell, {**curve_summary(curve, 475.0), "backend": "torch",
                            "curve": curve})
                    for cell, curve in zip(BENCHMARK.cells(params), curves, strict=True)]


def test_solved_needs_three_evaluations_in_a_row_and_final_and_best_are_reported():
    lucky = [(2500, 500.0), (5000, 20.0), (7500, 500.0), (10000, 500.0), (12500, 30.0)]
    kept = [(2500, 100.0), (5000, 480.0), (7500, 500.0), (10000, 490.0), (12500, 500.0)]
    params, done = _done([lucky, kept])
    (row,) = BENCHMARK.summarise(params, done).rows
    assert row["solved (3 in a row)"] == "1/2"
    assert row["median steps to solved"] == 10000  # kept's third evaluation at the goal
    assert row["final return"] == "265.0 [30.0, 500.0]"
    assert row["best return"] == "500.0 [500.0, 500.0]"


def test_too_few_evaluation_episodes_or_an_unknown_env_are_refused(capsys):
    assert bench.main(["learning", "--set", "eval-episodes=5"]) == 2
    assert "eval-episodes must be >= 10" in capsys.readouterr().err
    assert bench.main(["learning", "--set", "envs=CartPole-v2"]) == 2
    assert "no learning task CartPole-v2" in capsys.readouterr().err
