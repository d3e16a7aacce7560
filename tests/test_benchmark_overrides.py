"""The benchmarks' ``--set KEY=VALUE`` overrides and ``--results-name`` folders are checked
before a single cell runs, so a typo fails at once with the field or flag named instead of
after hours, and no results land outside simulations/results/. (The harness's benchmarks,
``python -m fedq.simulations.bench``, write only to their registered name.)"""

import sys

import pytest

from fedq.common.config import ConfigError
from fedq.simulations import bench, bench_federation, bench_federation_levers


@pytest.mark.parametrize("main", [bench_federation.main])
@pytest.mark.parametrize(("override", "key", "problem"), [
    ("server-momentun=0.5", "server-momentun", "unknown"),
    ("learning-rate=-1", "learning-rate", "must be > 0"),
])
def test_a_bad_override_fails_naming_the_field_before_any_run(main, override, key, problem,
                                                              monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # any run would leave runs/ here
    monkeypatch.setattr(sys, "argv", ["bench", "--set", override])
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        main()
    assert problem in str(err.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "key", "problem"), [
    ("server-momentun=0.5", "server-momentun", "unknown"),
    ("learning-rate=-1", "learning-rate", "must be > 0"),
])
def test_a_bad_learner_setting_of_the_privacy_sweep_fails_naming_the_field(
        override, key, problem, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["privacy_sweep", "--set", f"learner={override}"]) == 2
    err = capsys.readouterr().err
    assert f"config field '{key}'" in err and problem in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("main", [bench_federation_levers.main])
@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ""])
def test_a_results_name_that_is_not_one_plain_folder_fails_naming_the_flag(
        main, name, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench", "--results-name", name])
    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err
    assert "--results-name" in err and "letters, digits, - and _ only" in err
    assert not (tmp_path / "runs").exists()
