"""Bad config fails before training, with a message that names the field; the defaults
in pyproject.toml are exactly the config object's defaults."""

import tomllib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from common.config import ConfigError, FedqConfig
from common.envs import env_spec
from common.trainer import LocalTrainer

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


def config_table_markdown() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in FedqConfig.describe()]
    return "\n".join(rows)


def test_readme_documents_every_config_key_with_its_default():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- config-table:start -->\n")[1].split("<!-- config-table:end -->")[0]
    expected = config_table_markdown()
    assert table.strip() == expected, f"README config table is stale; replace it with:\n{expected}"


def test_command_line_assignments_read_toml_scalars_and_keep_json_objects_as_text():
    from common.config import parse_assignment

    assert parse_assignment("local-steps=2500") == ("local-steps", 2500)
    assert parse_assignment("double-dqn=false") == ("double-dqn", False)
    assert parse_assignment("env-id=CartPole-v1") == ("env-id", "CartPole-v1")
    assert parse_assignment('env-physics={"length": 0.3}') == ("env-physics", '{"length": 0.3}')
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("local-steps")
