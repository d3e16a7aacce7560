"""The numpy backend: same updates as the torch learner, same privacy ledger, no torch.

What these protect: a device may switch ``backend`` without changing what it learns (the
numpy learner's weights and Adam moments follow the torch learner's from the same
weights and batches, to float32 rounding); its epsilon is Opacus's; its state cannot be
silently dropped by a backend switch; and the ClientApp's numpy path runs with torch
absent. Tolerances are float32 rounding over a few steps (relative 1e-5 of the largest
weight), not one CPU's exact arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _replies import device_context, instruction
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedq.client.client_app import app
from fedq.client.device import device_from_context
from fedq.client.edge import main as client_main
from fedq.common import rdp
from fedq.common.config import BACKENDS, ConfigError, FedqConfig
from fedq.common.dp_sgd import DPSGD
from fedq.common.dqn import DQNLearner, PrivateDQNLearner
from fedq.common.learners import make_learner
from fedq.common.mlp_params import mlp_layout
from fedq.common.numpy_learner import NumpyDQNLearner, PrivateNumpyDQNLearner, _forward
from fedq.common.privacy import DevicePrivacy
from fedq.common.replay_buffer import ReplayBuffer
from fedq.common.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent
OBS, ACTIONS, BATCH = 4, 2, 32


def _filled_buffer(batch: int = BATCH) -> ReplayBuffer:
    """The same 300 random transitions (large rewards: the Huber loss's linear part and
    gradient clipping both take part) and the same sampling seed every call."""
    buffer = ReplayBuffer(500, OBS, batch, seed=3)
    rng = np.random.default_rng(5)
    for _ in range(300):
        buffer.add(rng.normal(size=OBS).astype(np.float32), int(rng.integers(ACTIONS)),
                   float(rng.normal() * 3), rng.normal(size=OBS).astype(np.float32),
                   bool(rng.random() < 0.1))
    return buffer


def _pair(**overrides: object) -> tuple[DQNLearner, NumpyDQNLearner]:
    config = FedqConfig.from_mapping({"batch-size": BATCH, "hidden-sizes": "16,8",
                                      "max-grad-norm": 1.0, **overrides})
    torch.manual_seed(0)
    torch_learner = DQNLearner(OBS, ACTIONS, config)
    numpy_learner = NumpyDQNLearner(OBS, ACTIONS, config)
    numpy_learner.load_online(torch_learner.online_arrays())
    torch_learner.bind(_filled_buffer())
    numpy_learner.bind(_filled_buffer())
    return torch_learner, numpy_learner


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-3)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=name)


@pytest.mark.parametrize("loss", ["huber", "mse"])
@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_numpy_learner_makes_the_torch_learners_updates(loss, double_dqn, tau):
    torch_learner, numpy_learner = _pair(**{"loss": loss, "double-dqn": double_dqn,
                                            "tau": tau, "learning-rate": 1e-3})
    for step in range(1, 13):
        torch_loss, numpy_loss = torch_learner.update(), numpy_learner.update()
        assert numpy_loss == pytest.approx(torch_loss, rel=1e-5)
        if step == 1:
            _assert_same(torch_learner.online_arrays(), numpy_learner.online_arrays())
        if step % 4 == 0:  # target syncs between updates, as the trainer does
            torch_learner.sync_target()
            numpy_learner.sync_target()
    _assert_same(torch_learner.online_arrays(), numpy_learner.online_arrays())
    _assert_same({k: v.numpy() for k, v in torch_learner.target.state_dict().items()},
                 numpy_learner.target.copy_dict())
    moments = {"exp_avg": numpy_learner.exp_avg, "exp_avg_sq": numpy_learner.exp_avg_sq}
    for key, flat in moments.items():
        torch_flat = np.concatenate([torch_learner.optimizer.state[p][key].numpy().ravel()
                                     for p in torch_learner.params])
        np.testing.assert_allclose(flat, torch_flat, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(torch_flat).max()), err_msg=key)
    assert all(float(torch_learner.optimizer.state[p]["step"]) == numpy_learner.adam_steps
               for p in torch_learner.params)


def test_numpy_learner_adds_the_fedprox_gradient_as_torch_does():
    torch_learner, numpy_learner = _pair(**{"strategy": "fedprox", "proximal-mu": 0.5,
                                            "learning-rate": 1e-2})
    for learner in (torch_learner, numpy_learner):
        learner.set_proximal(0.5)
        for _ in range(5):  # the proximal term only acts once w has left the anchor
            learner.update()
    _assert_same(torch_learner.online_arrays(), numpy_learner.online_arrays())


def test_numpy_learner_clips_targets_and_follows_learning_rate_changes_as_torch_does():
    """td-target-clip (the batch's rewards of +-3 push many CartPole targets below its
    bound of 1) and the trainer's learning-rate schedule, on both backends."""
    torch_learner, numpy_learner = _pair(**{"td-target-clip": True, "learning-rate": 1e-3})
    for step in range(1, 9):
        for learner in (torch_learner, numpy_learner):
            learner.set_learning_rate(1e-3 * (1 - step / 10))
        assert numpy_learner.update() == pytest.approx(torch_learner.update(), rel=1e-5)
    _assert_same(torch_learner.online_arrays(), numpy_learner.online_arrays())


def test_per_sample_clipped_sum_equals_the_torch_closed_form():
    config = FedqConfig.from_mapping({"hidden-sizes": "16,8", "dp-clip-norm": 0.3,
                                      "dp-enabled": True, "backend": "numpy"})
    torch.manual_seed(0)
    reference = DQNLearner(OBS, ACTIONS, config).online
    learner = PrivateNumpyDQNLearner(OBS, ACTIONS, config, DevicePrivacy(config))
    learner.load_online({k: v.numpy() for k, v in reference.state_dict().items()})
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(40, OBS)).astype(np.float32)
    actions = rng.integers(ACTIONS, size=40)
    output_grad = rng.normal(size=40).astype(np.float32)  # dLoss_i / dq_i
    dp = DPSGD(reference, config.dp_clip_norm, torch.Generator())
    q = dp.forward(torch.from_numpy(obs)).gather(1, torch.from_numpy(actions)[:, None])
    torch_norms = dp.backward((q[:, 0] * torch.from_numpy(output_grad)), 0.0, 1.0)
    outs = [np.empty((40, w.shape[0]), np.float32) for w, _ in learner._layers]
    _forward(learner._layers, obs, outs)
    douts = [np.zeros_like(o) for o in outs]
    douts[-1][np.arange(40), actions] = output_grad
    norms = learner._clipped_sum(obs, outs, douts)
    np.testing.assert_allclose(norms, torch_norms.numpy(), rtol=1e-5)
    assert (norms > config.dp_clip_norm).any() and (norms < config.dp_clip_norm).any()
    _assert_same({k: v.grad.numpy() for k, v in reference.named_parameters()},
                 learner.grad.copy_dict())


def test_private_numpy_update_matches_the_torch_dp_update_without_noise():
    """Same Poisson batch, noise 0: the numpy DP-SGD step is the torch DP-SGD step."""
    overrides = {"hidden-sizes": "16,8", "dp-enabled": True, "dp-noise-multiplier": 0.0,
                 "dp-clip-norm": 0.5, "batch-size": BATCH, "learning-rate": 1e-2}
    learners = []
    for backend in ("torch", "numpy"):
        config = FedqConfig.from_mapping({**overrides, "backend": backend})
        learner = make_learner(OBS, ACTIONS, config, DevicePrivacy(config), seed=0)
        learner.bind(_filled_buffer())
        learner.sampling_rng = np.random.default_rng(11)
        learners.append(learner)
    torch_learner, numpy_learner = learners
    assert isinstance(torch_learner, PrivateDQNLearner)
    numpy_learner.load_online(torch_learner.online_arrays())
    for _ in range(3):
        assert numpy_learner.update() == pytest.approx(torch_learner.update(), rel=1e-5)
    _assert_same(torch_learner.online_arrays(), numpy_learner.online_arrays())
    assert numpy_learner.privacy.history == torch_learner.privacy.history


def test_private_numpy_update_adds_noise_of_the_configured_scale():
    config = FedqConfig.from_mapping({"hidden-sizes": "64,64", "dp-enabled": True,
                                      "dp-noise-multiplier": 2.0, "dp-clip-norm": 0.5,
                                      "backend": "numpy", "batch-size": BATCH})
    learner = PrivateNumpyDQNLearner(OBS, ACTIONS, config, DevicePrivacy(config))
    learner.bind(_filled_buffer())
    learner.update()
    rate = BATCH / 256  # sample_rate's grid: a 300-transition buffer counts as 256
    assert learner.privacy.history == [(2.0, rate, 1)]
    # ~4.6k coordinates of noise std 2 x 0.5 over the expected batch (std estimate +-1 %);
    # the clipped sum adds at most clip-norm per transition, spread over all of them
    std = float(learner.grad.flat.std()) * rate * 300
    assert std == pytest.approx(2.0 * 0.5, rel=0.1)


@pytest.mark.parametrize("history", [
    [(1.0, 64 / 50_000, 10_000)],
    [(0.7, 0.0078125, 3_000), (0.7, 0.0015625, 20_000)],
    [(3.0, 0.5, 100)],
    [(1.1, 1.0, 50)],
    [(0.3, 0.01, 100_000)],
    [(10.0, 0.001, 1_000_000), (2.0, 0.02, 500)],
])
def test_rdp_accountant_agrees_with_opacus(history):
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert rdp.epsilon(history, 1e-5) == pytest.approx(opacus.get_epsilon(delta=1e-5),
                                                       rel=1e-6)


def test_rdp_ledger_steps_like_opacus():
    ledger, opacus = rdp.RdpLedger(), RDPAccountant()
    for noise, rate in [(1.0, 0.1)] * 3 + [(1.0, 0.2)] * 2 + [(1.5, 0.2), (1.0, 0.1)]:
        ledger.step(noise_multiplier=noise, sample_rate=rate)
        opacus.step(noise_multiplier=noise, sample_rate=rate)
    assert ledger.history == opacus.history


def test_numpy_device_ledger_reads_back_on_a_torch_device(tmp_path):
    """Same privacy.json whichever backend wrote it, and the same epsilon from it."""
    overrides = {"hidden-sizes": "16", "learning-starts": 100, "batch-size": 16,
                 "dp-enabled": True, "dp-noise-multiplier": 1.2}
    device = LocalTrainer(FedqConfig.from_mapping({**overrides, "backend": "numpy"}), 0)
    device.train(400)
    device.save(tmp_path)
    ledger = json.loads((tmp_path / (tmp_path / "CURRENT").read_text() / "privacy.json")
                        .read_text())
    assert sum(k for _, _, k in ledger["history"]) == 300
    torch_privacy = DevicePrivacy(FedqConfig.from_mapping(overrides))
    torch_privacy.load_state_dict(ledger)
    assert device.privacy.epsilon() == pytest.approx(torch_privacy.epsilon(), rel=1e-6)
    assert 0 < device.privacy.epsilon() < math.inf


def test_config_refuses_what_the_numpy_backend_cannot_run():
    with pytest.raises(ConfigError, match=r"'backend'.*one of"):
        FedqConfig.from_mapping({"backend": "jax"})
    with pytest.raises(ConfigError, match=r"'dp-accountant'.*backend 'torch'"):
        FedqConfig.from_mapping({"backend": "numpy", "dp-enabled": True,
                                 "dp-accountant": "prv"})


def test_torch_and_numpy_devices_train_the_same_global_model_in_one_federation(tmp_path):
    """Backends mix: each device's node config picks its own, the replies have the same
    layout, and both moved the weights from the same global model."""
    run_config = {**FedqConfig().to_mapping(), "run-dir": str(tmp_path),
                  "hidden-sizes": "16", "learning-starts": 100}
    rng = np.random.default_rng(0)
    global_weights = {k: rng.normal(0, 0.3, s).astype(np.float32)
                      for k, s in mlp_layout(4, 2, (16,)).items()}
    replies = {}
    for partition, backend in enumerate(BACKENDS):
        reply = app(instruction(partition, "train", RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in global_weights.items()}),
             "config": ConfigRecord({"local-steps": 300})})),
            device_context(partition, run_config, backend=backend))
        assert not reply.has_error(), reply.error
        replies[backend] = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    saved = {p.name for p in tmp_path.glob("devices/*/gen-*/learner.*")}
    assert saved == {"learner.pt", "learner.npz"}
    for weights in replies.values():
        assert {k: v.shape for k, v in weights.items()} == {
            k: v.shape for k, v in global_weights.items()}
        assert not all(np.array_equal(weights[k], global_weights[k]) for k in weights)


@pytest.mark.parametrize(("settings", "field"), [
    (["--set", "backend=jax"], "backend"),
    (["--set", "backend=numpy", "--set", "dp-enabled=true", "--set", "dp-accountant=prv"],
     "dp-accountant"),
])
def test_edge_client_refuses_a_backend_it_cannot_run_before_connecting(
        tmp_path, capsys, settings, field):
    with pytest.raises(SystemExit) as exited:
        client_main(["--server", "127.0.0.1:9", "--state-dir", str(tmp_path), "--insecure",
                     *settings])
    assert exited.value.code == 2
    assert f"config field '{field}'" in capsys.readouterr().err


def test_node_config_naming_an_unknown_backend_fails_naming_the_field(tmp_path):
    context = device_context(0, {**FedqConfig().to_mapping(), "run-dir": str(tmp_path)},
                             backend="jax")
    with pytest.raises(ConfigError, match=r"config field 'backend'"):
        device_from_context(context)


def test_device_state_of_the_other_backend_is_refused_not_dropped(tmp_path):
    small = {"hidden-sizes": "16", "learning-starts": 50}
    torch_device = LocalTrainer(FedqConfig.from_mapping(small), 0)
    torch_device.train(100)
    torch_device.save(tmp_path)
    saved = sorted(p.name for p in tmp_path.rglob("*"))
    numpy_device = LocalTrainer(FedqConfig.from_mapping({**small, "backend": "numpy"}), 0)
    with pytest.raises(ConfigError, match=r"'backend'.*written by backend 'torch'"):
        numpy_device.load(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == saved


def test_numpy_device_state_round_trips(tmp_path):
    config = FedqConfig.from_mapping({"hidden-sizes": "16", "learning-starts": 50,
                                      "backend": "numpy"})
    device = LocalTrainer(config, 0)
    device.train(300)
    device.save(tmp_path)
    restored = LocalTrainer(config, 7)
    assert restored.load(tmp_path)
    for name in ("online", "target"):
        for key, value in getattr(device.learner, name).views.items():
            np.testing.assert_array_equal(getattr(restored.learner, name).views[key], value)
    np.testing.assert_array_equal(restored.learner.exp_avg_sq, device.learner.exp_avg_sq)
    assert restored.learner.adam_steps == device.learner.adam_steps == 250
    assert restored.rng.getstate() == device.rng.getstate()
    assert restored.learner.layout == mlp_layout(4, 2, (16,))


_NO_TORCH_DEVICE = textwrap.dedent("""
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        # as on a device installed without torch: importing it fails
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "opacus", "scipy"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoTorch())
    sys.path.insert(0, "tests")
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from _replies import device_context, instruction
    from fedq.client.client_app import app
    from fedq.common.config import FedqConfig
    from fedq.common.mlp_params import mlp_layout

    run_config = {**FedqConfig().to_mapping(), "run-dir": sys.argv[1], "backend": "numpy",
                  "hidden-sizes": "16", "learning-starts": 100, "eval-episodes": 2,
                  "dp-enabled": sys.argv[2] == "dp"}
    rng = np.random.default_rng(0)
    weights = ArrayRecord({k: Array(rng.normal(0, 0.3, s).astype(np.float32))
                           for k, s in mlp_layout(4, 2, (16,)).items()})
    context = device_context(0, run_config)
    # without DP, evaluation also fine-tunes a copy of the device's learner (personalize)
    evaluate = {"server-round": 1, "personalize-steps": 0 if sys.argv[2] == "dp" else 200}
    for kind, config in (("train", {"local-steps": 300}), ("evaluate", evaluate)):
        reply = app(instruction(0, kind, RecordDict(
            {"arrays": weights, "config": ConfigRecord(config)})), context)
        assert not reply.has_error(), reply.error
        metrics = dict(reply.content["metrics"])
        print(kind, metrics["num-examples"], metrics.get("dp-epsilon"),
              metrics.get("personalized-return-mean"))
    assert "torch" not in sys.modules and "opacus" not in sys.modules
    print("torch-free")
""")


@pytest.mark.parametrize("dp", ["dp", "plain"])
def test_client_app_trains_and_evaluates_on_numpy_with_torch_absent(tmp_path, dp):
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_DEVICE, str(tmp_path), dp],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "torch-free"
    assert lines[0].startswith("train 300 ") and lines[1].startswith("evaluate 2 ")
    epsilon = float(lines[0].split()[2])
    assert (0 < epsilon < math.inf) if dp == "dp" else epsilon == math.inf
    assert (lines[1].split()[3] == "None") == (dp == "dp")  # personalized return
    assert list(tmp_path.glob("devices/partition-0/gen-*/learner.npz"))


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A venv with a device's install of fedq (``pip install <checkout>``, no extras), as
    docs/edge.md tells a Raspberry Pi to do; FEDQ_DEVICE_VENV names a ready one instead."""
    if os.environ.get("FEDQ_DEVICE_VENV"):
        return Path(os.environ["FEDQ_DEVICE_VENV"])
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    done = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", str(ROOT)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_client_app_runs_in_a_torch_free_device_install(tmp_path, device_venv):
    python = device_venv / "bin" / "python"
    probe = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                            "('torch', 'opacus', 'scipy') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", f"{python} has {probe.stdout.strip()} installed"
    result = subprocess.run([python, "-c", _NO_TORCH_DEVICE, str(tmp_path), "dp"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "torch-free"
