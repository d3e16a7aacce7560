"""Exported policies act like the network they came from, and the exporter refuses files
and checkpoints it cannot trust with an error that names the problem."""

import hashlib
import importlib.util
import json
import struct

import numpy as np
import pytest
import torch

from fedq.common.config import FedqConfig
from fedq.common.export.calibrate import DAMPINGS, encode_calibrated
from fedq.common.export.checkpoint import CheckpointError, load_teacher, numpy_layers
from fedq.common.export.cli import main as export_main
from fedq.common.export.distill import distill
from fedq.common.export.encodings import INT8_MAX, decode, encode
from fedq.common.export.onnx_export import export_onnx, onnx_available
from fedq.common.export.policy_file import MAGIC, PolicyFileError, read_policy, write_policy
from fedq.common.export.prune import PruneError, magnitude_masks, prune_and_finetune
from fedq.common.mlp_forward import MlpForward
from fedq.common.networks import NumpyPolicy, QNetwork
from fedq.common.rollouts import collect_states
from fedq.common.trainer import LocalTrainer
from fedq.server.run_directory import RunDirectory

QUICK = {"learning-starts": 200, "exploration-steps": 1000, "buffer-size": 5000}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained CartPole 64-64 Q-network in a real run directory, and held-out
    states from its own rollouts (the fixed states every format is compared on)."""
    root = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-64 updates of a 64-64 MLP: more threads only contend
    config = FedqConfig.from_mapping({**QUICK, "run-dir": str(root)})
    trainer = LocalTrainer(config, seed=0)
    trainer.train(2500)
    run_dir = RunDirectory(root)
    run_dir.start(config)
    run_dir.save_checkpoint(4, trainer.learner.online.state_dict(), {})
    trainer.close()
    teacher = load_teacher(root)
    states = collect_states(NumpyPolicy(teacher.net).act, "CartPole-v1", 1000, seed=123,
                            epsilon=0.2)
    yield root, teacher, states
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration(trained):
    """Teacher states from other episodes than the fixed states (as fedq-export draws them)."""
    _, teacher, _ = trained
    return collect_states(NumpyPolicy(teacher.net).act, "CartPole-v1", 5000, seed=0)


def _q_values(layers, states):
    forward = MlpForward([(np.ascontiguousarray(w.T), b) for w, b in layers])
    return np.stack([forward.q_values(s) for s in states])


def _actions(layers, states):
    return _q_values(layers, states).argmax(axis=1)


def _teacher_actions(teacher, states):
    with torch.no_grad():
        return teacher.net(torch.from_numpy(states)).argmax(1).numpy()


def test_round_trip_keeps_greedy_actions_exact_for_fp32_and_99_percent_for_fp16_int8(
        trained, calibration, tmp_path):
    """The fixed states are the teacher's own rollouts; fp16 and int8 are written as
    fedq-export writes them, rounded by calibration on other teacher states."""
    _, teacher, states = trained
    expected = _teacher_actions(teacher, states)
    for encoding, required in (("fp32", 1.0), ("fp16", 0.99), ("int8", 0.99)):
        path = tmp_path / f"{encoding}.fqp"
        write_policy(path, numpy_layers(teacher.net), env_id="CartPole-v1", variant=encoding,
                     encoding=encoding, calibration_states=calibration)
        policy = read_policy(path)
        assert (policy.env_id, policy.layer_sizes, policy.encoding) == (
            "CartPole-v1", (4, 64, 64, 2), encoding)
        agreement = (_actions(policy.layers, states) == expected).mean()
        assert agreement >= required, (encoding, agreement)


def test_nearest_rounding_flips_only_near_ties(trained, tmp_path):
    """Without calibration, fp16 and int8 perturb each state's action gap Q(s,1) - Q(s,0)
    by a small error (its rms well below 1e-4 / 1e-2 of the Q-values), and with the
    output layer stored centred they flip the greedy action only where the gap itself is
    within that error: no state whose gap is 3 rms errors wide changes its action.

    The bar is relative to the encoding's own measured error, not to a fixed fraction of
    the Q-values, because the trained network (and so how many states sit near a tie)
    differs from one CPU's floating-point path to another's."""
    _, teacher, states = trained
    with torch.no_grad():
        q = teacher.net(torch.from_numpy(states)).numpy().astype(np.float64)
    gap = q[:, 1] - q[:, 0]
    for encoding, max_relative_error in (("fp16", 1e-4), ("int8", 1e-2)):
        path = tmp_path / f"{encoding}.fqp"
        write_policy(path, numpy_layers(teacher.net), env_id="CartPole-v1", variant=encoding,
                     encoding=encoding)
        stored_q = _q_values(read_policy(path).layers, states).astype(np.float64)
        rms_error = np.sqrt(np.mean((stored_q[:, 1] - stored_q[:, 0] - gap) ** 2))
        assert rms_error <= max_relative_error * np.abs(q).mean(), (encoding, rms_error)
        decisive = np.abs(gap) >= 3 * rms_error
        same = stored_q.argmax(1) == q.argmax(1)
        assert same[decisive].mean() >= 0.99, (encoding, same[decisive].mean())


def test_calibrated_int8_tracks_the_action_gaps_far_closer_than_nearest_rounding(
        trained, calibration):
    """What calibration is for: the gap Q(s,1) - Q(s,0) on held-out states."""
    _, teacher, states = trained
    layers = numpy_layers(teacher.net)
    sizes = (4, 64, 64, 2)

    def gap_error(arrays):
        q = _q_values(decode(arrays, sizes, "int8"), states)
        return np.abs(np.diff(q, axis=1) - np.diff(_q_values(layers, states), axis=1)).mean()

    nearest = gap_error(encode(layers, "int8"))
    calibrated = gap_error(encode_calibrated(layers, "int8", calibration))
    assert calibrated < nearest / 3, (calibrated, nearest)


def test_calibrated_rounding_keeps_the_damping_that_best_keeps_the_greedy_actions(
        trained, calibration):
    """No one GPTQ damping suits every teacher (int8 agreement 0.91-0.97 across dampings
    on one CartPole teacher): the exporter tries each and keeps the rounding that acts like
    the float network on most calibration states."""
    _, teacher, _ = trained
    layers = numpy_layers(teacher.net)
    reference = _actions(layers, calibration)

    def agreement(arrays):
        return (_actions(decode(arrays, (4, 64, 64, 2), "int8"), calibration)
                == reference).mean()

    alone = [agreement(encode_calibrated(layers, "int8", calibration, dampings=(d,)))
             for d in DAMPINGS]
    assert agreement(encode_calibrated(layers, "int8", calibration)) == max(alone)
    with pytest.raises(ValueError, match="dampings is empty"):
        encode_calibrated(layers, "int8", calibration, dampings=())


def test_calibration_leaves_units_the_states_never_excite_as_they_were(calibration):
    """A hidden unit that never fires on the calibration states tells the least-squares
    refit nothing about its outgoing weights; they must keep the teacher's values (up to
    rounding), not be zeroed, because a deployed device may reach states that fire it.
    All-zero rows must not make the solve singular either."""
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(8, 4)).astype(np.float32), np.zeros(8, np.float32)),
              (rng.normal(size=(2, 8)).astype(np.float32), np.zeros(2, np.float32))]
    layers[0][0][3] = 0.0  # unit 3: an all-zero row, never fires
    layers[0][1][5] = -100.0  # unit 5: a bias no CartPole state overcomes
    arrays = encode_calibrated(layers, "int8", calibration)
    stored = decode(arrays, (4, 8, 2), "int8")
    np.testing.assert_array_equal(stored[0][0][3], 0.0)
    # "up to rounding": the output layer is stored centred (a mean row, then each
    # action's deviation), so a decoded weight may be off by half an int8 step of the
    # mean row plus half a step of its own deviation row; the steps are the file's scales
    scales = arrays["scales"].astype(np.float64)
    mean_step, deviation_steps = scales[8], scales[9:11]
    half_steps = 0.5 * (mean_step + deviation_steps) * (1 + 1e-3)
    assert (np.abs(stored[1][0][:, 5] - layers[1][0][:, 5]) <= half_steps).all(), (
        stored[1][0][:, 5], layers[1][0][:, 5], half_steps)
    assert all(np.isfinite(w).all() and np.isfinite(b).all() for w, b in stored)


def test_weights_beyond_float16_range_are_refused_before_writing(tmp_path):
    layers = [(np.ones((2, 4), np.float32), np.array([1e6, 0.0], np.float32))]
    for encoding in ("fp16", "int8"):
        with pytest.raises(ValueError, match=r"biases reach .* beyond the float16 range"):
            write_policy(tmp_path / "big.fqp", layers, env_id="CartPole-v1", variant="x",
                         encoding=encoding)
    hidden = [(np.full((2, 4), 1e5, np.float32), np.zeros(2, np.float32)),
              (np.ones((2, 2), np.float32), np.zeros(2, np.float32))]
    with pytest.raises(ValueError, match=r"^weights reach 1e\+05, beyond the float16 range"):
        write_policy(tmp_path / "big.fqp", hidden, env_id="CartPole-v1", variant="x",
                     encoding="fp16")
    hidden[0][0][:] = 1e7  # int8 stores the levels fine, but not the scale 1e7 / 127
    with pytest.raises(ValueError, match=r"^int8 weight scales reach 7\.874e\+04"):
        write_policy(tmp_path / "big.fqp", hidden, env_id="CartPole-v1", variant="x",
                     encoding="int8", calibration_states=np.ones((8, 4)))
    assert not (tmp_path / "big.fqp").exists()


def test_calibration_states_of_the_wrong_width_are_refused(trained):
    _, teacher, _ = trained
    with pytest.raises(ValueError, match=r"calibration states have shape \(10, 3\)"):
        encode_calibrated(numpy_layers(teacher.net), "int8", np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"calibration states have shape \(0, 4\), "
                                         r"expected \(n >= 1, 4\)"):
        encode_calibrated(numpy_layers(teacher.net), "fp16", np.zeros((0, 4)))


def test_int8_is_symmetric_per_output_channel_and_within_half_a_step(trained):
    _, teacher, _ = trained
    layers = numpy_layers(teacher.net)
    arrays = encode(layers, "int8")
    first_w = layers[0][0]
    q = arrays["weights"][:first_w.size].reshape(first_w.shape).astype(np.float32)
    scales = arrays["scales"][:first_w.shape[0]].astype(np.float32)
    assert (np.abs(q).max(axis=1) >= INT8_MAX - 1).all()  # every row uses its full range
    assert (np.abs(q * scales[:, None] - first_w) <= scales[:, None] * 0.51 + 1e-6).all()


def test_size_of_int8_file_is_under_30_percent_of_fp32(trained, tmp_path):
    _, teacher, _ = trained
    layers = numpy_layers(teacher.net)
    sizes = {e: write_policy(tmp_path / e, layers, env_id="CartPole-v1", variant=e, encoding=e)
             for e in ("fp32", "int8")}
    assert sizes["int8"] <= 0.30 * sizes["fp32"]


def test_pruning_takes_the_big_matrix_first_and_keeps_the_thin_layers_dense():
    # Pruning every matrix by 75% left CartPole's hidden units 1 of their 4 inputs and
    # collapsed the exported policy (agreement 0.51, return 22 of 500); the 64x64 matrix
    # holds 91% of the weights and absorbs the whole sparsity within its 90% cap.
    torch.manual_seed(0)
    net = QNetwork(4, 2, (64, 64))
    masks = magnitude_masks(net, 0.75)
    density = [float(m.mean()) for m in masks]
    assert density[0] == 1.0 and density[2] == 1.0
    assert 0.1 <= density[1] < 0.25
    assert sum(int((m == 0).sum()) for m in masks) == round(0.75 * (256 + 4096 + 128))
    kept = masks[1].bool()  # the largest-magnitude weights are the ones kept
    weight = net.linear_layers()[1].weight.detach().abs()
    assert weight[kept].min() >= weight[~kept].max()


def test_pruning_refuses_a_sparsity_no_matrix_split_can_reach():
    with pytest.raises(PruneError, match=r"--sparsity 0\.95"):
        magnitude_masks(QNetwork(4, 2, (64, 64)), 0.95)


def test_pruning_refuses_to_return_a_network_that_acts_unlike_the_teacher():
    # the export writes nothing rather than a pruned policy that lost the teacher's actions
    torch.manual_seed(0)
    teacher = QNetwork(4, 2, (64, 64))
    states = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    with pytest.raises(PruneError, match=r"acts like the teacher in .* \(< 101%\)"):
        prune_and_finetune(teacher, states, 0.75, steps=5, min_agreement=1.01)


def test_pruning_keeps_masks_fixed_through_fine_tuning_and_survives_the_file(
        trained, tmp_path):
    _, teacher, states = trained
    # 600 fine-tuning steps: with 200, the agreement of teachers trained on other CPUs'
    # floating-point paths (other training seeds, likewise) fell to 0.90-0.92
    pruned, report = prune_and_finetune(teacher.net, states, 0.75, steps=600)
    assert report.sparsity == pytest.approx(0.75, abs=0.01)
    assert report.agreement_after >= max(report.agreement_before, 0.9)
    path = tmp_path / "pruned.fqp"
    small = write_policy(path, numpy_layers(pruned), env_id="CartPole-v1", variant="pruned",
                         encoding="sparse")
    full = write_policy(tmp_path / "full.fqp", numpy_layers(teacher.net),
                        env_id="CartPole-v1", variant="fp32", encoding="fp32")
    assert small < 0.4 * full
    for (w, b), (w2, b2) in zip(numpy_layers(pruned), read_policy(path).layers, strict=True):
        np.testing.assert_array_equal(w, w2)
        np.testing.assert_array_equal(b, b2)
    # the teacher itself is left unpruned
    assert all((layer.weight == 0).float().mean() < 0.1 for layer in teacher.net.linear_layers())


def test_distilled_student_is_a_quarter_of_the_parameters_and_acts_like_the_teacher(trained):
    _, teacher, states = trained
    # 1500 steps: with 600, teachers trained on other CPUs' floating-point paths (other
    # training seeds, likewise) were matched on only 0.86-0.90 of the states
    _, report = distill(teacher.net, states, (16, 16), steps=1500)
    assert report.student_parameters <= 0.25 * report.teacher_parameters
    assert report.agreement >= 0.9


def _corrupt(path, at, value=None):
    data = bytearray(path.read_bytes())
    data[at] = (data[at] ^ 0xFF) if value is None else value
    path.write_bytes(bytes(data))


def test_corrupted_truncated_or_foreign_files_are_refused_clearly(trained, tmp_path):
    _, teacher, _ = trained
    path = tmp_path / "p.fqp"
    write_policy(path, numpy_layers(teacher.net), env_id="CartPole-v1", variant="int8",
                 encoding="int8")
    original = path.read_bytes()
    _corrupt(path, len(original) - 10)  # one byte of the weights
    with pytest.raises(PolicyFileError, match="checksum mismatch"):
        read_policy(path)
    path.write_bytes(original[:len(original) // 2])
    with pytest.raises(PolicyFileError, match="truncated"):
        read_policy(path)
    path.write_bytes(original[:20])
    with pytest.raises(PolicyFileError, match="truncated"):
        read_policy(path)
    path.write_bytes(b"PK\x03\x04" + original[4:])
    with pytest.raises(PolicyFileError, match="not a fedq policy file"):
        read_policy(path)
    with pytest.raises(PolicyFileError, match="cannot read"):
        read_policy(tmp_path / "missing.fqp")


def test_a_well_checksummed_file_whose_header_lies_is_refused_naming_the_array(
        trained, tmp_path):
    _, teacher, _ = trained
    path = tmp_path / "p.fqp"
    write_policy(path, numpy_layers(teacher.net), env_id="CartPole-v1", variant="fp32",
                 encoding="fp32")
    data = path.read_bytes()
    header_len = struct.unpack("<I", data[40:44])[0]
    header = json.loads(data[44:44 + header_len])
    header["layer_sizes"] = [4, 64, 32, 2]  # the arrays no longer fit
    header_bytes = json.dumps(header).encode()
    body = struct.pack("<I", len(header_bytes)) + header_bytes + data[44 + header_len:]
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(PolicyFileError, match="array 'weights' is float32"):
        read_policy(path)


def _save(path, state, **extra):
    torch.save({"round": 1, "state_dict": state, **extra}, path)


def test_bad_checkpoints_are_refused_naming_the_problem(trained, tmp_path):
    root, teacher, _ = trained
    good = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    cases = {
        "missing keys \\['2.bias'\\]": {k: v for k, v in good.items() if k != "2.bias"},
        "tensor '2.weight' has shape \\(64, 32\\)": {**good, "2.weight": torch.zeros(64, 32)},
        "tensor '0.bias' has shape": {**good, "0.bias": torch.zeros(3)},
        "CartPole-v1 has obs dim 4": {**good, "0.weight": torch.zeros(64, 5)},
        "tensor '4.weight' is not finite": {**good, "4.weight": torch.full((2, 64), np.nan)},
    }
    for problem, state in cases.items():
        path = tmp_path / "bad.pt"
        _save(path, state)
        with pytest.raises(CheckpointError, match=problem):
            load_teacher(path, env_id="CartPole-v1")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_teacher(path, env_id="CartPole-v1")
    _save(path, good)
    with pytest.raises(CheckpointError, match="pass --env-id"):
        load_teacher(path)
    torch.save({"weights": good}, path)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_teacher(path, env_id="CartPole-v1")
    # a checkpoint inside a run whose config says other hidden sizes
    config = json.loads((root / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden-sizes": "32,32"}))
    _save(path, good)
    with pytest.raises(CheckpointError, match="'hidden-sizes' is '32,32'"):
        load_teacher(path)


def test_fedq_export_writes_the_formats_and_exits_2_on_a_bad_source(trained, tmp_path, capsys):
    root, _, _ = trained
    out = tmp_path / "out"
    assert export_main([str(root), "--out", str(out), "--formats", "fp32,int8",
                        "--states", "2000", "--finetune-steps", "300"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"fp32", "int8"}
    assert manifest["formats"]["int8"]["agreement"] >= 0.9  # held-out states, near-ties too
    assert manifest["round"] == 4
    assert export_main([str(tmp_path / "nowhere")]) == 2
    assert "not a checkpoint file" in capsys.readouterr().err
    assert export_main([str(root), "--out", str(out), "--formats", "fp32,gzip"]) == 2
    assert "unknown ['gzip']" in capsys.readouterr().err


@pytest.mark.skipif(not onnx_available() or importlib.util.find_spec("onnxruntime") is None,
                    reason="ONNX export/run needs the optional [export] extra "
                           "(onnx, onnxscript, onnxruntime)")
def test_onnx_export_gives_exactly_the_fp32_greedy_actions(trained, tmp_path):
    import onnxruntime as ort

    _, teacher, states = trained
    path = tmp_path / "policy.onnx"
    export_onnx(teacher.net, path, {"env_id": "CartPole-v1"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q = session.run(None, {"obs": states})[0]
    np.testing.assert_array_equal(q.argmax(1), _teacher_actions(teacher, states))
    assert session.get_modelmeta().custom_metadata_map["env_id"] == "CartPole-v1"
