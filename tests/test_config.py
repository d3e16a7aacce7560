"""Bad config fails before training, with a message that names the field; the defaults
in pyproject.toml are exactly the config object's defaults."""

import re
import tomllib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.config_docs import REGENERATE, configuration_markdown
from fedq.common.config_docs import main as config_docs_main
from fedq.common.envs import env_spec
from fedq.common.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_lists_every_key_with_its_default():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    assert app_config == FedqConfig().to_mapping()


def test_round_trip_through_the_flat_mapping():
    cfg = FedqConfig.from_mapping({"hidden-sizes": "32,16", "env-kwargs": '{"a": 1}'})
    assert cfg.hidden_sizes == (32, 16) and cfg.env_kwargs == {"a": 1}
    assert FedqConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(("key", "value", "message"), [
    ("learning-rate", -0.001, "must be > 0"),
    ("learning-rate", float("nan"), "finite"),
    ("min-available-clients", 0, "must be >= 1"),
    ("num-server-rounds", 0, "must be >= 1"),
    ("local-steps", 2.5, "expected an integer"),
    ("gamma", 1.5, "(0, 1]"),
    ("batch-size", True, "expected a number"),
    ("double-dqn", "yes", "true or false"),
    ("hidden-sizes", "64,x", "comma-separated integers"),
    ("hidden-sizes", "0", "widths >= 1"),
    ("env-kwargs", "[1, 2]", "JSON object"),
    ("env-kwargs", "{bad", "invalid JSON"),
    ("loss", "l1", "one of"),
    ("exploration-final-eps", 1.2, "[0, 1]"),
    ("run-dir", " ", "must not be empty"),
    ("exploration-clock", "wall", "one of"),
    ("strategy", "cyclic", "one of"),
])
def test_bad_values_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        FedqConfig.from_mapping({key: value})
    assert message in str(err.value)


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'learning-rte': unknown key.*learning-rate"):
        FedqConfig.from_mapping({"learning-rte": 0.1})


def test_cross_field_constraints():
    with pytest.raises(ConfigError, match=r"'batch-size'.*exceeds buffer-size"):
        FedqConfig.from_mapping({"batch-size": 128, "buffer-size": 64})
    with pytest.raises(ConfigError, match="'exploration-final-eps'"):
        FedqConfig.from_mapping({"exploration-initial-eps": 0.1, "exploration-final-eps": 0.5})


def test_unknown_env_id_names_env_id():
    with pytest.raises(ConfigError, match=r"'env-id'.*CartPol-v9"):
        env_spec("CartPol-v9")


def test_continuous_action_space_is_refused():
    with pytest.raises(ConfigError, match=r"'env-id'.*Discrete action space"):
        env_spec("Pendulum-v1")


def test_bad_make_kwargs_name_env_kwargs():
    with pytest.raises(ConfigError, match="'env-kwargs'"):
        env_spec("CartPole-v1", {"no_such_option": 3})


class _ImageLikeEnv(gym.Env):
    """A 2-D Box observation (like a small image) with Discrete actions."""

    def __init__(self, action_start: int = 0) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(3, 4), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2, start=action_start)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, bool(self.np_random.random() < 0.1), False, {}


gym.register("fedq-test/ImageLike-v0", entry_point=_ImageLikeEnv)


def test_multi_dimensional_box_observations_are_flattened_for_training():
    assert env_spec("fedq-test/ImageLike-v0").obs_dim == 12
    trainer = LocalTrainer(FedqConfig.from_mapping({
        "env-id": "fedq-test/ImageLike-v0", "hidden-sizes": "8", "learning-starts": 20,
        "batch-size": 8, "buffer-size": 100}), seed=0)
    stats = trainer.train(60)
    assert stats.updates == 40 and trainer.buffer.obs.shape[1] == 12
    assert len(trainer.evaluate(1)) == 1


def test_actions_not_starting_at_zero_are_refused():
    with pytest.raises(ConfigError, match=r"'env-id'.*starting at 1"):
        env_spec("fedq-test/ImageLike-v0", {"action_start": 1})


def test_env_spec_reads_the_spaces():
    spec = env_spec("Acrobot-v1")
    assert (spec.obs_dim, spec.n_actions) == (6, 3)


def test_configuration_reference_is_what_the_config_generates():
    """docs/configuration.md is generated: a key added, removed or redocumented in
    FedqConfig fails here until the file is regenerated with the command the message names."""
    path = ROOT / "docs" / "configuration.md"
    assert path.read_text() == configuration_markdown(), (
        f"{path.relative_to(ROOT)} is stale: regenerate it with `{REGENERATE}` from the "
        "repository root and commit it")


def _table_rows(markdown: str) -> list[list[str]]:
    """Cells of each body row, split where a table would: at every unescaped ``|``."""
    lines = [line for line in markdown.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_configuration_reference_has_one_three_cell_row_per_key_with_its_default():
    rows = _table_rows(configuration_markdown())
    assert all(len(row) == 3 for row in rows), [row for row in rows if len(row) != 3]
    defaults = FedqConfig().to_mapping()
    assert [row[0] for row in rows] == [f"`{key}`" for key in defaults]
    by_key = {row[0].strip("`"): row for row in rows}
    assert by_key["learning-rate"][1] == "`0.0005`"
    assert by_key["target-return"][1] == "`inf`"
    assert by_key["env-id"][1] == '`"CartPole-v1"`'
    assert r"mu/2 \|\|w - w_global\|\|^2" in by_key["proximal-mu"][2]


def test_config_docs_command_writes_the_reference_and_refuses_a_missing_folder(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert config_docs_main(["--out", str(out)]) == 0
    assert out.read_text() == configuration_markdown()
    assert config_docs_main(["--out", str(tmp_path / "nowhere" / "configuration.md")]) == 2
    assert "'" + str(tmp_path / "nowhere") + "' does not exist" in capsys.readouterr().err


def test_command_line_assignments_read_toml_scalars_and_keep_json_objects_as_text():
    from fedq.common.config import parse_assignment

    assert parse_assignment("local-steps=2500") == ("local-steps", 2500)
    assert parse_assignment("double-dqn=false") == ("double-dqn", False)
    assert parse_assignment("env-id=CartPole-v1") == ("env-id", "CartPole-v1")
    assert parse_assignment('env-physics={"length": 0.3}') == ("env-physics", '{"length": 0.3}')
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("local-steps")
