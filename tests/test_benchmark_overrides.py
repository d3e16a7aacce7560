"""The benchmarks' ``--set KEY=VALUE`` overrides are checked like any config before a
single cell runs, so a typo fails at once with the field named instead of after hours."""

import sys

import pytest

from common.config import ConfigError
from simulations import bench_federation, privacy_sweep


@pytest.mark.parametrize("main", [bench_federation.main, privacy_sweep.main])
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
