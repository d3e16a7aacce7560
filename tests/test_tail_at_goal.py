"""The late-budget reading of the 150k CartPole results (simulations/tail_at_goal.py): a
setting is judged on how often its model is at the goal late in the budget, not on one
final evaluation, and the committed table is what the committed results give."""

import json

import pytest

from fedq.simulations import tail_at_goal
from fedq.simulations.tail_at_goal import RESULTS, SOURCES, report, summary_row, tail_share


def test_the_tail_counts_only_evaluations_after_its_start_and_skips_missing_ones():
    curve = [[97_500, 500.0], [100_000, 500.0], [102_500, 100.0], [105_000, None],
             [147_500, 475.0], [150_000, 474.9]]
    assert tail_share(curve, after=100_000) == pytest.approx(1 / 3)  # 100.0, 475.0, 474.9
    assert tail_share(curve, after=140_000) == 0.5
    assert tail_share(curve, after=150_000) is None


def test_a_row_counts_finals_replays_and_tails_per_seed():
    runs = [{"seed": 0, "final": 500.0, "replay": 480.0, "last third": 0.5, "last 10k": 1.0},
            {"seed": 1, "final": 300.0, "replay": None, "last third": 0.0, "last 10k": None}]
    row = summary_row("fedavg", runs)
    assert row["final >= goal"] == "1/2"
    assert row["final model, 100 fresh episodes >= goal"] == "1/1"
    assert row["last third at goal, %"] == "25 (50, 0)"
    assert row["last 10k at goal, %"] == "100 (100, -)"


def test_the_committed_table_is_what_the_committed_results_give():
    """A regenerated source fails this until ``python -m fedq.simulations.tail_at_goal``
    is rerun."""
    payload, text = report()
    folder = RESULTS / tail_at_goal.OUT
    assert json.loads((folder / "tail_at_goal.json").read_text()) == json.loads(
        json.dumps(payload))
    assert (folder / "tail_at_goal.md").read_text() == text


def test_every_committed_150k_federated_cartpole_result_is_a_source():
    committed = {p.name for p in RESULTS.glob("federation_n[0-9]*") if p.is_dir()}
    assert committed <= set(SOURCES)
