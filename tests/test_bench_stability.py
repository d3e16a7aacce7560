"""The stability sweeps on the harness (simulations/bench_stability.py): variants combine
left to right into the settings a cell runs; a bad variant, env, budget or evaluation
count is refused naming its parameter before any cell runs; what an env cannot run is
left out with a note; sweeps with the same (variant, seed) share the cell; and a tiny
real CartPole cell runs end to end, reporting its Q bound, with unfinished seeds named
rather than silently dropped."""

import json

import pytest

from fedq.simulations import bench
from fedq.simulations.bench_stability import plan, variant_settings
from fedq.simulations.harness import (
    BENCHMARKS,
    HarnessError,
    fingerprint,
    resolve_params,
    run_benchmark,
)
from fedq.simulations.learning_tasks import TASKS

bench.load_benchmarks()
SWEEPS = [name for name in BENCHMARKS if name.startswith("stability_sweep")]


def _params(**overrides):
    return resolve_params(BENCHMARKS["stability_sweep_cartpole5"], overrides, quick=False)


def test_six_committed_sweeps_are_registered_and_each_plans_its_cells():
    assert SWEEPS == ["stability_sweep_quick", "stability_sweep_quick5",
                      "stability_sweep_cartpole5", "stability_sweep_decay_two_thirds",
                      "stability_sweep_batch128", "stability_sweep_acrobot_quick"]
    sizes = {name: len(BENCHMARKS[name].cells(resolve_params(BENCHMARKS[name], {}, False)))
             for name in SWEEPS}
    assert sizes == {"stability_sweep_quick": 18, "stability_sweep_quick5": 20,
                     "stability_sweep_cartpole5": 15, "stability_sweep_decay_two_thirds": 10,
                     "stability_sweep_batch128": 10, "stability_sweep_acrobot_quick": 6}


def test_variants_combine_left_to_right_into_the_settings_a_cell_runs():
    settings = variant_settings(TASKS["CartPole-v1"], "old-defaults+td-clip+lr-decay")
    assert settings["backend"] == "numpy"
    assert settings["td-target-clip"] is True  # td-clip overrides old-defaults' False
    assert settings["learning-rate-decay-steps"] == 150_000  # lr-decay over the budget
    two_thirds = variant_settings(TASKS["CartPole-v1"], "lr-decay-two-thirds")
    assert (two_thirds["learning-rate-decay-steps"], two_thirds["learning-rate-final"]) == (
        100_000, 0.0)
    planned, skipped = plan(_params(variants="defaults,td-clip", seeds=2))
    assert not skipped
    assert [(env, variant, cell.params["seed"]) for env, variant, cell in planned] == [
        ("CartPole-v1", "defaults", 0), ("CartPole-v1", "defaults", 1),
        ("CartPole-v1", "td-clip", 0), ("CartPole-v1", "td-clip", 1)]
    cell = planned[0][2]
    assert (cell.params["max-steps"], cell.params["eval-every"]) == (150_000, 2500)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"variants": "td-clip+lr-decya"}, r"variants: unknown 'lr-decya' in 'td-clip\+lr-decya'"),
    ({"variants": " , "}, "variants: none given"),
    ({"envs": "CartPole-v2"}, r"envs: unknown \['CartPole-v2'\]"),
    ({"eval-episodes": 5}, "eval-episodes must be >= 10"),
    ({"seeds": 0}, "seeds: must be >= 1"),
    ({"budget-scale": 1.5}, r"budget-scale: must be in \(0, 1\]"),
    ({"budget-scale": 0.1, "eval-every": 4000}, "eval-every: CartPole-v1's budget of 15,000"),
])
def test_bad_parameters_fail_naming_the_parameter_before_any_cell(overrides, message):
    with pytest.raises(HarnessError, match=message):
        plan(_params(**overrides))


def test_a_variant_an_env_cannot_run_is_left_out_with_a_note():
    """LunarLander's per-step rewards have no known bound, so td-clip cannot run there
    (and without the box2d extra no LunarLander cell can): noted, the rest still runs."""
    planned, skipped = plan(_params(envs="CartPole-v1,LunarLander-v3",
                                    variants="defaults,td-clip", seeds=1))
    lunar = [variant for env, variant, _ in planned if env == "LunarLander-v3"]
    assert lunar in ([], ["defaults"])
    assert [v for env, v, _ in planned if env == "CartPole-v1"] == ["defaults", "td-clip"]
    assert any(note.startswith("LunarLander-v3") for note in skipped)


def test_sweeps_share_the_cells_they_have_in_common():
    """stability_sweep_quick's seeds 0-2 of the variants quick5 repeats are quick5's
    seeds 0-2: regenerating both runs them once."""
    def fingerprints(name):
        params = resolve_params(BENCHMARKS[name], {}, quick=False)
        return {(variant, cell.params["seed"]): fingerprint(cell)
                for _, variant, cell in plan(params)[0]}

    quick, quick5 = fingerprints("stability_sweep_quick"), fingerprints("stability_sweep_quick5")
    shared = set(quick) & set(quick5)
    assert len(shared) == 4 * 3
    assert all(quick[key] == quick5[key] for key in shared)


def test_a_tiny_real_sweep_reports_its_q_bound_and_names_the_seeds_not_run(tmp_path):
    benchmark = BENCHMARKS["stability_sweep_cartpole5"]
    run_benchmark(benchmark, quick=True, cache_root=tmp_path / "cache",
                  results_root=tmp_path / "results", log=lambda line: None)
    record = json.loads((tmp_path / "results" / benchmark.name / "results.json").read_text())
    (row,) = record["summary"]
    assert (row["env"], row["variant"], row["seeds"], row["budget"]) == (
        "CartPole-v1", "td-clip", 1, 600)
    assert abs(row["Q bound"] - 100.0) < 1e-9  # CartPole at gamma 0.99: 1 / (1 - 0.99)
    (run,) = record["runs"]
    assert [steps for steps, _ in run["curve"]] == [300, 600]
    assert run["peak-max-q"] == max(q for _, q in run["max-q"]) > 0
    assert (tmp_path / "results" / benchmark.name / "curves.png").stat().st_size > 0
    # a second seed not run yet: reported as such, the finished one kept
    run_benchmark(benchmark, overrides={"seeds": 2}, quick=True, report=True,
                  cache_root=tmp_path / "cache", results_root=tmp_path / "report",
                  log=lambda line: None)
    record = json.loads((tmp_path / "report" / benchmark.name / "results.json").read_text())
    assert [r["seed"] for r in record["runs"]] == [0]
    assert record["not-run"] == ["CartPole-v1 / td-clip seed 1"]
    assert "Not run yet: CartPole-v1 / td-clip seed 1" in (
        tmp_path / "report" / benchmark.name / "results.md").read_text()
