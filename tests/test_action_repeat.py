"""``action-repeat``: each decision plays N env steps through gymnasium's RepeatAction,
for training and evaluation alike, inside the image wrappers (skipped frames are never
preprocessed); bad values are refused naming the field."""

import importlib.util

import gymnasium as gym
import numpy as np
import pytest

from fedq.common.action_repeat import DrawLastRepeat
from fedq.common.config import ConfigError, FedqConfig
from fedq.common.envs import ImageObs, make_env
from fedq.common.rollouts import play_episodes
from fedq.common.trainer import LocalTrainer


@pytest.mark.parametrize("value", [0, -2])
def test_an_action_repeat_below_one_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"'action-repeat': must be >= 1"):
        FedqConfig.from_mapping({"action-repeat": value})


def test_repeated_actions_sum_the_rewards_and_stop_where_the_episode_ends():
    """Always pushing left, CartPole falls after the same frames whether each decision is
    one frame or four: the return (one per frame) is the same, the decisions a quarter."""
    decisions = {}
    for repeat in (1, 4):
        env = make_env("CartPole-v1", action_repeat=repeat)
        env.reset(seed=3)
        done, n = False, 0
        while not done:
            _, _, terminated, truncated, _ = env.step(0)
            done, n = terminated or truncated, n + 1
        decisions[repeat] = n
        env.close()
    frames = play_episodes(lambda _obs: 0, "CartPole-v1", 1, seed=3)[0]
    assert play_episodes(lambda _obs: 0, "CartPole-v1", 1, seed=3, action_repeat=4) == [frames]
    assert decisions == {1: frames, 4: -(-frames // 4)}


def test_a_device_counts_decisions_and_its_env_repeats_each():
    config = FedqConfig.from_mapping({"action-repeat": 3, "learning-starts": 0,
                                      "batch-size": 4})
    device = LocalTrainer(config, seed=0)
    stats = device.train(20)
    assert stats.env_steps == device.counters.env_steps == 20
    assert isinstance(device.env, gym.wrappers.RepeatAction) and device.env.num_repeats == 3
    device.close()


@pytest.mark.skipif(importlib.util.find_spec("Box2D") is None,
                    reason="needs fedq[pixels] (box2d)")
def test_image_wrappers_see_only_the_frame_each_decision_ends_on():
    env = make_env("CarRacing-v3", {"continuous": False}, None, ImageObs(True, 48, 2),
                   action_repeat=4)
    chain = []
    while isinstance(env, gym.Wrapper):
        chain.append(type(env).__name__)
        env = env.env
    assert chain[:4] == ["FrameStackObservation", "ResizeObservation",
                         "GrayscaleObservation", "DrawLastRepeat"]


@pytest.mark.skipif(importlib.util.find_spec("Box2D") is None,
                    reason="needs fedq[pixels] (box2d)")
def test_car_racing_skips_drawing_repeated_frames_yet_sees_what_repeat_action_sees():
    """DrawLastRepeat's frames, rewards and endings equal gymnasium's RepeatAction's,
    also where the time limit (151 frames) ends an episode inside a decision."""
    def rollout(env):
        seen = []
        for episode in range(2):
            obs, _ = env.reset(seed=episode)
            rng, done = np.random.default_rng(episode), False
            while not done:
                action = 3 if episode == 0 else int(rng.integers(5))  # gas; random
                obs, reward, terminated, truncated, _ = env.step(action)
                seen.append((obs.copy(), reward, terminated, truncated))
                done = terminated or truncated
        return seen

    fast = make_env("CarRacing-v3", {"continuous": False, "max_episode_steps": 151},
                    action_repeat=3)
    plain = gym.wrappers.RepeatAction(
        gym.make("CarRacing-v3", continuous=False, max_episode_steps=151), 3)
    assert isinstance(fast, DrawLastRepeat)
    for a, b in zip(rollout(fast), rollout(plain), strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:] == b[1:]
