"""The benchmarks' shared reading of a learning curve: "solved" is the goal held on three
evaluations in a row, never one lucky evaluation, and final/best are always reported."""

from fedq.simulations.results_io import curve_summary, solved_at, spread


def test_one_lucky_evaluation_is_not_solved():
    touched_once = [(2500, 500.0), (5000, 13.7), (7500, 74.0), (10000, 47.0)]
    assert solved_at(touched_once, 475.0) is None
    held = [(2500, 480.0), (5000, 475.0), (7500, 300.0), (10000, 490.0), (12500, 500.0),
            (15000, 500.0), (17500, 20.0)]
    assert solved_at(held, 475.0) == 15000  # the third evaluation of the first run of 3
    assert curve_summary(held, 475.0) == {"solved-at": 15000, "final-return": 20.0,
                                          "best-return": 500.0}


def test_negative_goals_and_the_spread_over_seeds():
    acrobot = [(10000, -500.0), (20000, -95.0), (30000, -100.0), (40000, -90.0)]
    assert solved_at(acrobot, -100.0) == 40000
    assert spread([500.0, 13.7, 74.0]) == "74.0 [13.7, 500.0]"
    assert spread([]) == "-"
