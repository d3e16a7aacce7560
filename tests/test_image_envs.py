"""Image observations end to end on CarRacing-v3: gymnasium's wrappers configured per run,
CNN Q-networks trained by the same learners (DP-SGD through Opacus's per-sample
gradients), and every bad combination refused before any process starts, naming the field."""

import importlib.util

import numpy as np
import pytest
import torch

from fedq.common.config import ConfigError, FedqConfig
from fedq.common.envs import ImageObs, make_env, run_env_spec
from fedq.common.network_registry import build_network
from fedq.common.trainer import LocalTrainer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("Box2D") is None,
                                reason="needs fedq[pixels] (box2d)")

CAR = {"env-id": "CarRacing-v3", "env-kwargs": '{"continuous": false}'}
SMALL = {**CAR, "network": "edge-cnn", "obs-grayscale": True, "obs-resize": 24,
         "obs-frame-stack": 2, "buffer-size": 100, "batch-size": 8, "learning-starts": 10}


def test_gymnasiums_wrappers_give_the_configured_uint8_shapes():
    cases = {ImageObs(): (96, 96, 3), ImageObs(grayscale=True): (96, 96),
             ImageObs(resize=84): (84, 84, 3), ImageObs(True, 84, 4): (4, 84, 84)}
    for image, shape in cases.items():
        env = make_env("CarRacing-v3", {"continuous": False}, None, image)
        obs, _ = env.reset(seed=0)
        assert env.observation_space.shape == shape and obs.shape == shape
        assert obs.dtype == np.uint8
        env.close()


def test_an_image_env_with_the_mlp_is_refused_naming_the_network_field():
    with pytest.raises(ConfigError, match=r"'network': 'mlp' reads vector observations, but "
                                          r"'CarRacing-v3' observes images of shape \(96, 96, 3\)"
                                          r".*use one of nature-cnn, edge-cnn"):
        run_env_spec(FedqConfig.from_mapping(CAR))
    with pytest.raises(ConfigError, match=r"'network': 'edge-cnn' reads image.*use one of mlp"):
        run_env_spec(FedqConfig.from_mapping({"network": "edge-cnn"}))  # CartPole


def test_fedq_simulate_and_fedq_client_refuse_bad_pixel_configs_before_starting(tmp_path):
    from fedq.client.edge import device_node_config
    from fedq.simulations.run import resolve_run_config

    bad = {
        "network": {**CAR},
        "buffer-memory-mb": {**CAR, "network": "nature-cnn", "obs-frame-stack": 4,
                             "buffer-size": 100_000},  # 96x96x3 frames: 3.2 GiB
    }
    for field, overrides in bad.items():
        with pytest.raises(ConfigError, match=f"'{field}'"):
            resolve_run_config({**overrides, "run-dir": str(tmp_path / "run")}, 2)
    with pytest.raises(ConfigError, match=r"'network'.*runs on backend torch, not 'numpy'"):
        device_node_config("CarRacing-v3", ["network=\"edge-cnn\"", "backend=\"numpy\""],
                           tmp_path / "state")


def test_a_cnn_device_trains_and_evaluates_with_the_same_learner():
    device = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=0)
    stats = device.train(20)
    assert stats.updates == 10 and np.isfinite(stats.mean_loss)
    assert device.buffer.obs_dtype == np.uint8 and device.buffer.obs_shape == (2, 24, 24)
    assert set(device.learner.online_arrays()) >= {"features.0.weight", "head.2.bias"}
    device.close()


def test_cnn_dp_sgd_clips_each_transitions_gradient_as_opacus_defines_it():
    """Noise off: the update's gradient is the sum of per-transition gradients, each
    clipped to C, over the expected batch size; checked against one backward per row."""
    import gymnasium as gym

    from fedq.common.dp_sgd_opacus import PerSampleDPSGD

    torch.manual_seed(0)
    space = gym.spaces.Box(0, 255, (2, 24, 24), np.uint8)
    config = FedqConfig(network="edge-cnn")
    net, reference = build_network(config, space, 3), build_network(config, space, 3)
    reference.load_state_dict(net.state_dict())
    obs = torch.randint(0, 256, (6, 2, 24, 24), dtype=torch.uint8)
    targets = torch.randn(6, 3) * 5
    dp = PerSampleDPSGD(net, clip_norm=0.5, generator=torch.Generator().manual_seed(0))
    losses = ((dp.forward(obs) - targets) ** 2).sum(1)
    norms = dp.backward(losses, noise_multiplier=0.0, expected_batch_size=4.0)
    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(6):
        reference.zero_grad()
        ((reference(obs[i:i + 1]) - targets[i]) ** 2).sum().backward()
        grads = [p.grad for p in reference.parameters()]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        assert norms[i].item() == pytest.approx(norm.item(), rel=1e-4)
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, 0.5 / (norm.item() + 1e-6)) / 4.0
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_a_private_cnn_device_takes_dp_sgd_steps_into_its_accountant():
    config = FedqConfig.from_mapping({**SMALL, "dp-enabled": True})
    device = LocalTrainer(config, seed=0)
    stats = device.train(14)
    assert stats.updates == 4 and stats.privacy.steps_total == 4 and stats.privacy.epsilon > 0
    device.close()


def test_fedq_export_writes_a_cnns_onnx_formats_and_fedq_policy_refuses_them(tmp_path,
                                                                            capsys):
    """A CNN checkpoint exports to fp32 / fp16 / int8 ONNX with size, agreement and latency
    per decision in its manifest; the .fqp formats are refused for it, and the numpy-only
    runner refuses the ONNX file, each with a message saying why."""
    import json

    from fedq.client.policy_runner import main as policy_main
    from fedq.common.export.cli import main as export_main
    from fedq.common.export.onnx_export import onnx_available
    from fedq.server.run_directory import RunDirectory

    config = FedqConfig.from_mapping({**SMALL, "run-dir": str(tmp_path)})
    net = build_network(config, run_env_spec(config).observation_space, 5)
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    run_dir.save_checkpoint(1, net.state_dict(), {})
    assert export_main([str(tmp_path), "--formats", "int8,student"]) == 2
    assert "['int8', 'student'] are MLP formats" in capsys.readouterr().err
    if not onnx_available():
        assert export_main([str(tmp_path)]) == 2
        assert "pip install 'fedq[export]'" in capsys.readouterr().err
        return
    assert export_main([str(tmp_path), "--states", "20"]) == 0
    formats = json.loads((tmp_path / "export" / "manifest.json").read_text())["formats"]
    assert set(formats) == {"onnx", "onnx-fp16", "onnx-int8"}
    assert formats["onnx"]["agreement"] == 1.0
    assert formats["onnx-fp16"]["bytes"] < 0.6 * formats["onnx"]["bytes"]
    assert formats["onnx-int8"]["bytes"] < 0.4 * formats["onnx"]["bytes"]
    assert all(f["decision_ms"] > 0 and f["agreement"] >= 0.5 for f in formats.values())
    capsys.readouterr()
    assert policy_main(["info", str(tmp_path / "export" / "policy.onnx")]) == 2
    assert "fedq-policy runs the .fqp policies of MLP Q-networks" in capsys.readouterr().err


@pytest.mark.slow
def test_the_car_racing_scenario_runs_end_to_end_in_the_simulation_engine(tmp_path):
    """The shipped pixel scenario on a tiny budget (2 devices, 2 rounds of 30 steps,
    50-step episodes): CNN weights travel, each device's frame buffer resumes between
    rounds from its saved state, and federated evaluation runs the CNN."""
    import json
    from pathlib import Path

    from fedq.simulations.run import main

    scenario = Path(__file__).resolve().parents[1] / "simulations/scenarios/car_racing_pixels.toml"
    run_dir = tmp_path / "run"
    tiny = {"local-steps": 30, "learning-starts": 10, "buffer-size": 300, "eval-episodes": 1,
            "target-update-interval": 20,
            "env-kwargs": '{"continuous": false, "max_episode_steps": 50}'}
    sets = [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")]
    assert main(["--scenario", str(scenario), "--clients", "2", "--rounds", "2",
                 "--run-dir", str(run_dir), *sets, "--quiet"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train"]["updates"] > 0 and r["eval"]["clients"] == 2 for r in rows)
    assert rows[-1]["env-steps-per-client-total"] == 60
    device = LocalTrainer(FedqConfig.from_mapping(
        {**json.loads((run_dir / "config.json").read_text()), "client-overrides": "{}"}), seed=0)
    assert device.load(run_dir / "devices" / "partition-0") and len(device.buffer) == 60
    device.close()
