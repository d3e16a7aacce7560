"""The benchmarks' config settings (``--set learner=KEY=VALUE,...``, ``--set
strategies=...``) are checked before a single cell runs, so a typo fails at once with the
field named instead of after hours. (The harness's benchmarks, ``python -m
fedq.simulations.bench``, write only to their registered name.)"""

import pytest

from fedq.simulations import bench


@pytest.mark.parametrize("benchmark", ["federation", "privacy_sweep"])
@pytest.mark.parametrize(("setting", "key", "problem"), [
    ("learner=server-momentun=0.5", "server-momentun", "unknown"),
    ("learner=learning-rate=-1", "learning-rate", "must be > 0"),
])
def test_a_bad_learner_setting_fails_naming_the_field_before_any_run(
        benchmark, setting, key, problem, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # any run would leave runs/ here
    assert bench.main([benchmark, "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"config field '{key}'" in err and problem in err
    assert not (tmp_path / "runs").exists()


def test_an_unknown_strategy_of_the_federation_benchmark_fails_naming_it(
        monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["federation", "--set", "strategies=sequential,fedavgg"]) == 2
    assert "strategies: unknown ['fedavgg']; known: fedavg" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
