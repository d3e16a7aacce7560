"""The learning benchmark on the harness (simulations/bench_learning.py): a tiny real
CartPole cell runs end to end through ``bench learning --quick``; "solved" is 3 greedy
evaluations in a row at the goal, never one lucky one; too few evaluation episodes and
unknown envs are refused; every cell records max |Q|, and a killed cell resumes from its
last evaluation."""

import json

import pytest

from fedq.common.trainer import LocalTrainer
from fedq.simulations import bench
from fedq.simulations.bench_learning import BENCHMARK
from fedq.simulations.harness import resolve_params
from fedq.simulations.learning_cell import resume_dir, run_seed
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
    # max |Q| per evaluation; a finished cell leaves no resume state behind
    assert [steps for steps, _ in run["max-q"]] == [500, 1000, 1500]
    assert all(0 < q < 1e4 for _, q in run["max-q"])
    assert run["resumed-at"] == []
    assert not list((tmp_path / "runs").rglob("learning-run/*.resume"))
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
    assert "envs: unknown ['CartPole-v2']; known: CartPole-v1" in capsys.readouterr().err


def test_a_cell_killed_after_an_evaluation_resumes_there_with_its_curve(
        tmp_path, monkeypatch):
    """LunarLander's 500k steps outlast a session on a shared CPU: a cell stopped at any
    point continues from its last evaluation instead of step 0."""
    params = {"env": "CartPole-v1", "seed": 0, "goal": 475.0, "settings": {},
              "max-steps": 1500, "eval-every": 500, "eval-episodes": 2}
    workdir = tmp_path / "cell.work"
    evaluate = LocalTrainer.evaluate
    calls = []

    def killed_at_the_second_evaluation(self, *args, **kwargs):
        calls.append(self.counters.env_steps)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a killed run leaves: state of the first only
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "evaluate", killed_at_the_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run_seed(params, workdir)
    assert resume_dir(workdir).is_dir()
    monkeypatch.setattr(LocalTrainer, "evaluate", evaluate)
    calls.clear()
    result = run_seed(params, workdir)
    assert result["resumed-at"] == [500]
    assert [steps for steps, _ in result["curve"]] == [500, 1000, 1500]
    assert [steps for steps, _ in result["max-q"]] == [500, 1000, 1500]
    assert not resume_dir(workdir).exists()
