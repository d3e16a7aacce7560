"""The resume_wait benchmark (simulations/bench_resume_wait.py): its cells alternate the
crashes and remedies repeat by repeat, bad parameters fail before any process starts,
and its table puts each wait against the same crash's stopped runs. The real cell runs in
`bench resume_wait --quick` (~35 s); tests/test_deployment.py protects the stop recipe."""

import pytest

from fedq.simulations.bench_resume_wait import cells, metrics_rows, summary
from fedq.simulations.harness import BENCHMARKS, HarnessError


def _params(**over):
    return {**BENCHMARKS["resume_wait"].defaults, **over}


def test_cells_alternate_crash_and_remedy_within_each_repeat():
    order = [(c.params["repeat"], c.params["crash"], c.params["remedy"])
             for c in cells(_params(repeats=2))]
    assert order[:4] == [(0, "serverapp-kill", "resubmit"),
                         (0, "serverapp-kill", "stop-then-resubmit"),
                         (0, "superlink-restart", "resubmit"),
                         (0, "superlink-restart", "stop-then-resubmit")]
    assert len(order) == 8 and order[4][0] == 1


@pytest.mark.parametrize(("over", "named"), [
    ({"crashes": "serverapp-kil"}, "crashes: unknown"),
    ({"remedies": "wait"}, "remedies: unknown"),
    ({"rounds": 2}, "rounds: >= 3"),
    ({"repeats": 0}, "repeats: a whole number"),
])
def test_bad_parameters_are_named_before_anything_runs(over, named):
    with pytest.raises(HarnessError, match=named):
        cells(_params(**over))


def _result(crash, remedy, first_round, repeat=0):
    return {"crash": crash, "remedy": remedy, "repeat": repeat, "rounds": [1, 2, 3],
            "round-seconds": [1.0, first_round, 1.5], "resubmission-seconds": first_round + 15,
            "crash-to-done-seconds": first_round + 16, "crashed-submit-exit": 1}


def test_the_table_puts_each_wait_against_the_same_crashs_stopped_runs():
    rows = summary([_result("serverapp-kill", "resubmit", 52.0),
                    _result("serverapp-kill", "stop-then-resubmit", 1.0),
                    _result("serverapp-kill", "resubmit", 50.0, repeat=1),
                    _result("serverapp-kill", "stop-then-resubmit", 2.0, repeat=1)])
    by = {r["remedy"]: r for r in rows}
    assert by["resubmit"]["vs stop-then-resubmit"] == pytest.approx(51.0 / 1.5)
    assert by["resubmit"]["resumed round 2 s"] == "51.0 [50.0, 52.0]"
    assert by["resubmit"]["waited (round 2 > 10 s)"] == "2/2"
    assert by["stop-then-resubmit"]["waited (round 2 > 10 s)"] == "0/2"
    assert by["stop-then-resubmit"]["vs stop-then-resubmit"] == pytest.approx(1.0)
    assert all(r["every round once"] and r["crashed run's fedq-submit exit"] == [1]
               for r in rows)


def test_metrics_rows_are_read_strictly_a_torn_line_names_the_file_and_line(tmp_path):
    """A resume that left a torn or garbled row fails the cell; skipping the line would
    count the run as keeping every round."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n')
    assert [r["round"] for r in metrics_rows(path)] == [1, 2]
    for bad in ('{"round": 3, "ret', "[3]"):
        path.write_text(f'{{"round": 1}}\n{{"round": 2}}\n{bad}\n')
        with pytest.raises(HarnessError, match=r"metrics\.jsonl:3: not a metrics row"):
            metrics_rows(path)
