"""simulations/seed_spread.py: the interval it puts on a privacy benchmark's share of the
non-private return must cover what the seeds allow, and bad input must name what is wrong."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedq.simulations.seed_spread import main, spreads

RESULTS = Path(__file__).resolve().parent.parent / "simulations" / "results"


def _results(rows: dict[str, list[float]]) -> dict:
    return {"summary": [{"setting": s, "per-seed final": v} for s, v in rows.items()]}


def test_identical_seeds_give_a_share_of_one_with_no_spread():
    (row,) = spreads(_results({"no-dp": [500.0, 120.0, 480.0], "dp": [500.0, 120.0, 480.0]}))
    assert row.share == pytest.approx(1.0) and row.low == pytest.approx(1.0)
    assert row.high == pytest.approx(1.0) and row.p_at_target == 1.0


def test_bimodal_finals_leave_the_share_unresolved():
    """Seeds that either reach 500 or collapse: 5 of them cannot tell 0.8 from 1.0."""
    (row,) = spreads(_results({"no-dp": [500, 500, 137, 500, 277],
                               "dp": [122, 126, 387, 437, 500]}))
    assert row.share == pytest.approx(np.mean([122, 126, 387, 437, 500]) / np.mean(
        [500, 500, 137, 500, 277]))
    assert row.low < 0.6 and row.high > 1.2 and row.seeds_for_tenth > 50


def test_the_committed_privacy_pretrain_shares_at_epsilon_8_and_4_are_not_resolved():
    """Whatever the committed run's means say, its 5 seeds leave 90% inside the interval."""
    rows = {r.setting: r for r in spreads(json.loads(
        (RESULTS / "privacy_pretrain" / "results.json").read_text()))}
    for setting in ("DP-SGD epsilon 8", "DP-SGD epsilon 4"):
        assert rows[setting].seeds == 5
        assert rows[setting].low < 0.9 < rows[setting].high, rows[setting]


def test_bad_input_is_named(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"summary": [{"setting": "no-dp"}]}))
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "per-seed final" in capsys.readouterr().err
    path.write_text(json.dumps(_results({"no-dp": [1.0, 2.0], "dp": [1.0]})))
    with pytest.raises(ValueError, match="dp: 1 seeds against the baseline's 2"):
        spreads(json.loads(path.read_text()))
    with pytest.raises(ValueError, match="--baseline: no setting 'x'"):
        spreads(json.loads(path.read_text()), baseline="x")
