"""The CarRacing learning run loses nothing when stopped: run again, it resumes from its
last evaluation with the device's whole state, and the committed curve grows; a run dir
is never continued under another config."""

import importlib.util
import json

import pytest

from fedq.simulations import carracing_learning, results_io

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("Box2D") is None,
                                 reason="needs fedq[pixels] (box2d)")]

TINY = ["--eval-every", "20", "--set", 'env-kwargs={"continuous": false, "max_episode_steps": 40}',
        "--set", "obs-resize=24", "--set", "buffer-size=200", "--set", "batch-size=8",
        "--set", "learning-starts=10"]


def test_a_stopped_run_resumes_where_its_last_evaluation_left_it(tmp_path, monkeypatch):
    monkeypatch.setattr(results_io, "RESULTS_ROOT", tmp_path / "results")
    run = ["--run-dir", str(tmp_path / "run"), "--results-name", "tiny", *TINY]
    assert carracing_learning.main(["--decisions", "20", *run]) == 0
    first = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert carracing_learning.main(["--decisions", "40", *run]) == 0
    state = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert [p["decisions"] for p in state["points"]] == [20, 40]
    assert state["points"][0] == first["points"][0]
    assert state["random_returns"] == first["random_returns"] and len(first["random_returns"]) == 3
    assert all(len(p["greedy_returns"]) == 3 for p in state["points"])
    assert state["points"][1]["updates"] == (40 - 10) // 2  # one every 2 decisions after 10
    results = json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())
    assert results["summary"]["decisions"] == 40
    assert results["summary"]["env_frames"] == 160  # action-repeat 4
    assert (tmp_path / "results" / "tiny" / "curve.png").exists()
    with pytest.raises(SystemExit):  # another config in the same run dir: refused
        carracing_learning.main(["--decisions", "60", *run, "--set", "learning-rate=0.001"])

