"""simulations/final_model_replay.py scores what a federated run *ended with*: the latest
round checkpoint (not best.pt, not an earlier round) of each committed cell whose work dir
is cached, and says which runs it could not score."""

import json

import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.simulations import final_model_replay

# Q(push right) - Q(push left) = angle + angular velocity: push towards the fall
LEAN = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]])
BALANCING = {"0.weight": LEAN, "0.bias": torch.zeros(2),
             "2.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "2.bias": torch.zeros(2)}
PUSHING_LEFT = {**BALANCING, "2.weight": torch.zeros(2, 2), "2.bias": torch.tensor([1.0, 0.0])}


def _run(work, rounds, seconds=1.0):
    work.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
    work.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    config = FedqConfig.from_mapping({"hidden-sizes": "2"})
    (work / "checkpoints").mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(config.to_mapping()))
    for number, state in rounds.items():
        torch.save({"round": number, "state_dict": state},
                   work / "checkpoints" / f"round-{number:04d}.pt")


def test_the_latest_round_is_scored_and_uncached_or_other_runs_are_named(tmp_path):
    cache, results = tmp_path / "cache", tmp_path / "results"
    cells = [{"kind": "federated-run", "fingerprint": f"fp{seed}", "seconds": 1.0,
              "params": {"overrides": {"strategy": "fedavg", "seed": seed}}}
             for seed in range(4)]
    (results / "probe").mkdir(parents=True)
    (results / "probe" / "results.json").write_text(json.dumps({"cells": cells}))
    # seed 0 ended balancing after a bad round 9; seed 1 ended pushing left after a good
    # round 9 (round 10 sorts after round 9); seed 2's work dir is not cached here; seed 3's
    # is a rerun of the cell (another time than the committed run's), not its run
    _run(cache / "federated-run" / "fp0.work", {9: PUSHING_LEFT, 10: BALANCING})
    _run(cache / "federated-run" / "fp1.work", {9: BALANCING, 10: PUSHING_LEFT})
    _run(cache / "federated-run" / "fp3.work", {10: BALANCING}, seconds=2.0)

    rows = final_model_replay.replay("probe", 20, cache_root=cache, results_root=results)

    assert [r["checkpoint"] for r in rows] == ["round-0010.pt", "round-0010.pt", None, None]
    assert [r["status"] for r in rows] == ["scored", "scored", "not cached here",
                                           "cached from another run of the cell"]
    balanced, pushed, missing, other = (r["final model return"] for r in rows)
    assert balanced > 5 * pushed and missing is None and other is None
    (summary,) = final_model_replay.summary(rows)
    assert summary["runs scored"] == "2/4"
    assert summary[">= 475"] == f"{int(balanced >= 475) + int(pushed >= 475)}/2"


def test_runs_of_different_federation_sizes_are_summarised_apart():
    rows = [{"strategy": "sequential", "clients": n, "seed": seed,
             "final model return": 500.0 if n == 2 else 100.0}
            for n in (2, 8) for seed in (0, 1)]
    two, eight = final_model_replay.summary(rows)
    assert (two["clients"], two[">= 475"], eight["clients"], eight[">= 475"]) == (
        2, "2/2", 8, "0/2")


def test_a_benchmark_without_cached_work_dirs_fails_naming_the_cache(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)  # the cache root is relative: nothing cached here
    with pytest.raises(SystemExit):
        final_model_replay.main(["federation_n4_every500"])
    assert "its work dir in runs/harness" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "named"), [
    (["federation_n4_every500", "--episodes", "0"], "--episodes: >= 1, got 0"),
    (["no_such_benchmark"], "no_such_benchmark: no results.json in"),
])
def test_bad_arguments_fail_naming_the_argument(argv, named, capsys):
    with pytest.raises(SystemExit):
        final_model_replay.main(argv)
    assert named in capsys.readouterr().err
