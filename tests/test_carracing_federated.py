"""The federated CarRacing report judges issue 19's target as stated: the federation's
best return within half the single device's steps (to its best) against that best."""

import json

from fedq.simulations import carracing_federated, results_io

SINGLE = {"summary": {"random_mean": -30.0},
          "points": [{"decisions": d, "greedy_mean": g}
                     for d, g in [(4000, -60.0), (8000, 100.0), (12000, 400.0), (16000, 350.0)]]}


def _report(tmp_path, monkeypatch, federated):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"round": i + 1, "env-steps-per-client-total": s,
                    "eval": {} if r is None else {"eval-return-mean": r}}) + "\n"
        for i, (s, r) in enumerate(federated)))
    (run / "config.json").write_text(json.dumps({"num-server-rounds": len(federated)}))
    single = tmp_path / "single.json"
    single.write_text(json.dumps(SINGLE))
    monkeypatch.setattr(carracing_federated, "SINGLE", single)
    monkeypatch.setattr(results_io, "RESULTS_ROOT", tmp_path / "results")
    assert carracing_federated.main(["--run-dir", str(run), "--results-name", "fed"]) == 0
    return json.loads((tmp_path / "results" / "fed" / "results.json").read_text())["summary"]


def test_the_target_is_met_only_by_a_return_within_half_the_single_devices_steps(
        tmp_path, monkeypatch):
    # the single device's best, 400, came at 12,000 decisions: the federation has 6,000
    summary = _report(tmp_path, monkeypatch, [(2000, None), (4000, 120.0), (6000, 410.0),
                                              (8000, 500.0)])
    assert summary["federated_best_within_half"] == 410.0 and summary["target_met"]
    assert summary["federated_best"] == 500.0 and summary["federated_final"] == 500.0


def test_a_return_reached_only_past_half_the_steps_does_not_meet_it(tmp_path, monkeypatch):
    summary = _report(tmp_path, monkeypatch, [(2000, -50.0), (6000, 300.0), (8000, 450.0)])
    assert summary["federated_best_within_half"] == 300.0 and not summary["target_met"]
