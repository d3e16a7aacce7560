"""The stability sweep plans the cells it says it runs, leaves out what an env cannot run
with a note, caches each cell under a name that changes with its settings, and runs on
numpy and gymnasium alone (the lead runs it on a 16-core machine without torch or flwr
loaded in its 16 workers)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from fedq.simulations.learning_tasks import TASKS
from fedq.simulations.sweep_stability import plan, variant_settings


def test_variants_combine_and_each_cell_is_named_by_its_settings():
    settings = variant_settings(TASKS["CartPole-v1"], "td-clip+lr-decay")
    assert settings["td-target-clip"] is True
    assert settings["learning-rate-decay-steps"] == 150_000
    assert settings["backend"] == "numpy"
    cells, skipped = plan(["CartPole-v1"], ["defaults", "td-clip"], 2, 1.0, None, 10)
    assert not skipped
    assert [(c.variant, c.seed) for c in cells] == [
        ("defaults", 0), ("defaults", 1), ("td-clip", 0), ("td-clip", 1)]
    assert cells[0].digest() == cells[1].digest() != cells[2].digest()
    assert cells[0].max_steps == 150_000 and cells[0].eval_every == 2500


def test_a_variant_an_env_cannot_run_is_left_out_with_a_note():
    cells, skipped = plan(["LunarLander-v3"], ["defaults", "td-clip"], 1, 1.0, None, 10)
    assert all(c.variant == "defaults" for c in cells)  # none at all without box2d
    assert any("LunarLander-v3" in note for note in skipped)


def test_a_cell_runs_and_caches_without_torch_or_flwr(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        from fedq.simulations.sweep_stability import plan, run_and_cache
        (cell,), _ = plan(["CartPole-v1"], ["td-clip"], 1, 0.004, 300, 10)
        result = run_and_cache((cell, {str(tmp_path)!r}))
        loaded = sorted(m for m in ("torch", "flwr", "opacus") if m in sys.modules)
        print(json.dumps({{"loaded": loaded, "path": str(cell.path(__import__("pathlib")
              .Path({str(tmp_path)!r}))), **{{k: result[k] for k in (
              "solved-at", "final-return", "peak-max-q", "q-bound", "curve")}}}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert [s for s, _ in report["curve"]] == [300, 600]
    assert abs(report["q-bound"] - 100.0) < 1e-9
    assert report["peak-max-q"] > 0
    cached = json.loads(Path(report["path"]).read_text())
    assert cached["final-return"] == report["final-return"]


def test_report_writes_the_cached_cells_and_names_the_rest_without_running_them(
        tmp_path, monkeypatch):
    """An interrupted sweep on a loaded machine still yields honest results: the finished
    seeds, and which cells were never run."""
    from fedq.simulations import results_io
    from fedq.simulations.sweep_stability import main, run_and_cache

    cache = tmp_path / "cache"
    (seed0, seed1), _ = plan(["CartPole-v1"], ["td-clip"], 2, 0.004, 300, 10)
    run_and_cache((seed0, str(cache)))
    monkeypatch.setattr(results_io, "RESULTS_ROOT", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", [
        "sweep_stability", "--envs", "CartPole-v1", "--variants", "td-clip", "--seeds", "2",
        "--budget-scale", "0.004", "--eval-every", "300", "--cache", str(cache),
        "--results-name", "probe", "--report"])
    main()
    payload = json.loads((tmp_path / "results" / "probe" / "results.json").read_text())
    assert [r["seed"] for r in payload["runs"]] == [0]
    assert payload["not-run"] == ["CartPole-v1 / td-clip seed 1"]
    assert not seed1.path(cache).exists()
    assert "Not run (--report): CartPole-v1 / td-clip seed 1" in (
        tmp_path / "results" / "probe" / "results.md").read_text()
