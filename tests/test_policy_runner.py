"""The on-device runner: acts without torch, refuses observations it cannot trust, and
feeds the experience it records into the device's next federated round."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedq.client import experience_log
from fedq.client.experience_log import DeviceStateError, ExperienceRecorder
from fedq.client.policy_runner import ObservationError, PolicyRunner
from fedq.common import trainer as trainer_module
from fedq.common.config import FedqConfig
from fedq.common.export.checkpoint import numpy_layers
from fedq.common.export.policy_file import write_policy
from fedq.common.rollouts import play_episodes
from fedq.common.state_store import state_lock
from fedq.common.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"hidden-sizes": "16,16", "buffer-size": 400, "batch-size": 32, "learning-starts": 100,
         "exploration-steps": 300}


@pytest.fixture(scope="module")
def trained_device(tmp_path_factory):
    """A device that finished one round: its state dir and an exported int8 policy."""
    root = tmp_path_factory.mktemp("device")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny updates: more threads only contend
    trainer = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=3)
    trainer.train(250)
    trainer.save(root / "state")
    write_policy(root / "policy.fqp", numpy_layers(trainer.learner.online),
                 env_id="CartPole-v1", variant="int8", encoding="int8")
    trainer.close()
    torch.set_num_threads(threads)
    return root


@pytest.fixture
def device(trained_device, tmp_path):
    """A fresh copy of the trained device per test (recording changes its state)."""
    shutil.copytree(trained_device, tmp_path / "device")
    return tmp_path / "device" / "state", tmp_path / "device" / "policy.fqp"


def test_runner_rejects_wrong_shape_dtype_and_non_finite_observations(device):
    _, policy = device
    runner = PolicyRunner.load(policy)
    assert runner.act(np.zeros(4, dtype=np.float32)) in (0, 1)
    assert runner.act(np.zeros(4, dtype=np.float64)) in (0, 1)  # numeric dtypes are cast
    with pytest.raises(ObservationError, match=r"shape \(5,\), the policy expects \(4,\)"):
        runner.act(np.zeros(5, dtype=np.float32))
    with pytest.raises(ObservationError, match=r"shape \(1, 4\)"):
        runner.act(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ObservationError, match="dtype <U1"):
        runner.act(np.array(["a", "b", "c", "d"]))
    with pytest.raises(ObservationError, match="NaN or Inf"):
        runner.act(np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32))
    with pytest.raises(ObservationError, match="NaN or Inf"), np.errstate(over="ignore"):
        runner.act(np.array([0.0, 1e39, 0.0, 0.0]))  # overflows float32


def test_fedq_policy_runs_episodes_and_records_without_torch(device):
    """The whole device path (load, act, episodes, latency, recording into the replay
    buffer) in a process where ``import torch`` fails."""
    state_dir, policy = device
    code = ("import sys; sys.modules['torch'] = None; "
            "from fedq.client.policy_runner import main; "
            f"sys.exit(main(['run', {str(policy)!r}, '--episodes', '2', '--epsilon', '0.1', "
            f"'--record-to', {str(state_dir)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "episodes 2: return mean" in done.stdout
    assert "latency p50" in done.stdout and "p99" in done.stdout
    assert "recorded" in done.stdout
    bad = subprocess.run([sys.executable, "-c", code.replace("'--episodes', '2'",
                                                             "'--episodes', '0'")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--episodes" in bad.stderr


def test_policy_runner_acts_with_numpy_alone(device):
    """A device's own control loop embeds PolicyRunner: no torch, no gymnasium."""
    _, policy = device
    code = ("import sys; sys.modules['torch'] = sys.modules['gymnasium'] = None; "
            "import numpy as np; from client.policy_runner import PolicyRunner; "
            f"print(PolicyRunner.load({str(policy)!r}).act(np.zeros(4)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("0", "1")


def test_recorded_experience_is_in_the_buffer_the_next_round_loads(device):
    state_dir, policy = device
    before = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=3)
    assert before.load(state_dir)
    reference = before.buffer  # what ReplayBuffer.add would make of the same transitions
    recorder = ExperienceRecorder(state_dir, obs_dim=4)
    seen = []

    def record(*transition):
        seen.append(transition)
        recorder(*transition)
        reference.add(np.asarray(transition[0]), transition[1], transition[2],
                      np.asarray(transition[3]), transition[4])

    runner = PolicyRunner.load(policy)
    play_episodes(runner.act, "CartPole-v1", 40, seed=7, epsilon=0.05, on_transition=record)
    assert len(seen) > 150  # enough to wrap the 400-transition ring buffer
    assert recorder.flush() == len(seen)
    after = LocalTrainer(FedqConfig.from_mapping(SMALL), seed=3)
    assert after.load(state_dir)
    assert len(after.buffer) == len(reference) == 400
    assert after.buffer.pos == reference.pos
    for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
        np.testing.assert_array_equal(getattr(after.buffer, name), getattr(reference, name))
    assert after.counters == before.counters  # recorded steps are not learner steps
    after.train(50)  # and the next round trains on them
    # the new generation is current; the one before it stays as the one spare
    assert sorted(p.name for p in state_dir.glob("gen-*")) == ["gen-000001", "gen-000002"]
    assert (state_dir / "CURRENT").read_text() == "gen-000002"


def test_recording_needs_a_device_that_saved_its_state(tmp_path, device):
    with pytest.raises(DeviceStateError, match="must complete one federated round"):
        ExperienceRecorder(tmp_path / "fresh", obs_dim=4)
    state_dir, _ = device
    with pytest.raises(DeviceStateError, match="observes 6 values"):
        ExperienceRecorder(state_dir, obs_dim=6)


def test_writer_follows_the_trainer_state_layout():
    assert experience_log.BUFFER_FILE == trainer_module._BUFFER_FILE


def test_record_to_waits_for_the_state_lock_a_training_round_holds(device):
    """``fedq-policy run --record-to`` takes the device's state lock, the one a training
    round holds from load to save: while it is held the recorder gives up after
    ``--lock-timeout`` with an error naming the state dir, and writes nothing."""
    state_dir, policy = device
    command = [sys.executable, "-m", "fedq.client.policy_runner", "run", str(policy),
               "--episodes", "1", "--record-to", str(state_dir), "--lock-timeout", "1"]
    with state_lock(state_dir):  # as the ClientApp's train handler holds it
        before = sorted(p.name for p in state_dir.iterdir())
        held = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert held.returncode == 2
    assert f"device state dir '{state_dir}' is locked by another writer" in held.stderr
    assert sorted(p.name for p in state_dir.iterdir()) == before
    free = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr
    assert "recorded" in free.stdout
