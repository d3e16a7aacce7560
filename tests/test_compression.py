"""Compressed updates: fp16/int8 round trips stay within their quantisation bounds, error
feedback keeps the server's running sum of updates within one quantisation step of the
truth (instead of drifting), the residual survives a device restart, int8 is >= 3.5x
smaller than fp32 weights on the default network, and malformed payloads are refused."""

import numpy as np
import pytest

from fedq.common.compression import (
    CompressionError,
    as_record,
    decode_deltas,
    decode_update,
    encode_update,
    payload_bytes,
)
from fedq.common.config import FedqConfig
from fedq.common.networks import QNetwork
from fedq.common.trainer import LocalTrainer


def _weights(hidden=(64, 64), seed=0):
    net = QNetwork(4, 2, hidden)
    rng = np.random.default_rng(seed)
    global_weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    local = {k: (g + rng.normal(0, 0.02, g.shape)).astype(np.float32)
             for k, g in global_weights.items()}
    return global_weights, local


def test_fp16_round_trip_is_within_half_precision():
    global_weights, local = _weights()
    payload, residual = encode_update(local, global_weights, {}, "fp16")
    restored = decode_update(payload, global_weights, "fp16")
    for k, g in global_weights.items():
        delta = local[k] - g
        assert np.all(np.abs(restored[k] - local[k]) <= np.abs(delta) * 2**-11 + 1e-7)
        np.testing.assert_allclose(residual[k], delta - (restored[k] - g), atol=1e-7)


def test_int8_round_trip_error_is_at_most_half_a_step_per_row():
    global_weights, local = _weights()
    payload, residual = encode_update(local, global_weights, {}, "int8")
    restored = decode_update(payload, global_weights, "int8")
    for k, g in global_weights.items():
        delta = (local[k] - g).reshape(g.shape[0] if g.ndim == 2 else 1, -1)
        step = np.abs(delta).max(axis=1, keepdims=True) / 127  # one scale per output row
        error = np.abs((restored[k] - local[k]).reshape(delta.shape))
        assert np.all(error <= 0.5 * step * 1.01 + 1e-7)  # 1%: the scale is sent as fp16
        np.testing.assert_allclose(residual[k].reshape(delta.shape),
                                   delta - (restored[k] - g).reshape(delta.shape), atol=1e-7)


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_error_feedback_keeps_the_summed_updates_on_track(mode):
    """A device sends the same true delta d for 60 rounds. The server's sum of decoded
    deltas must stay within one round's quantisation error of 60 d: the residual carries
    what each round dropped into the next, so errors do not add up."""
    global_weights, local = _weights(seed=1)
    rounds, residual = 60, {}
    total = {k: np.zeros_like(g) for k, g in global_weights.items()}
    for _ in range(rounds):
        payload, residual = encode_update(local, global_weights, residual, mode)
        for k, d in decode_deltas(payload, global_weights, mode).items():
            total[k] += d
    _, one_round = encode_update(local, global_weights, {}, mode)
    for k, g in global_weights.items():
        truth = rounds * (local[k] - g)
        drift = np.abs(total[k] - truth)
        assert np.all(drift <= np.abs(one_round[k]).max() * 1.01 + 1e-5)
        np.testing.assert_allclose(total[k] + residual[k], truth, atol=1e-4)


def test_int8_payload_is_at_least_3_5x_smaller_than_fp32_weights():
    global_weights, local = _weights()
    full = payload_bytes(as_record(local))
    for mode, ratio in (("fp16", 2.0), ("int8", 3.5)):
        payload, _ = encode_update(local, global_weights, {}, mode)
        assert full / payload_bytes(payload) >= ratio, mode
    none, residual = encode_update(local, global_weights, {"x": np.ones(1)}, "none")
    assert payload_bytes(none) == full and residual == {}


@pytest.mark.parametrize(("mode", "payload", "message"), [
    ("int8", {"delta-int8": np.zeros(3, np.int8)}, "expected ['delta-int8', 'delta-scales']"),
    ("int8", {"delta-int8": np.zeros(3, np.int8), "delta-scales": np.zeros(1, np.float16)},
     "expected int8[40]"),
    ("fp16", {"delta-fp16": np.zeros(40, np.float32)}, "expected float16[40]"),
])
def test_payloads_that_do_not_fit_the_encoding_are_refused(mode, payload, message):
    global_weights = {"a.weight": np.zeros((4, 8), np.float32), "a.bias": np.zeros(8, np.float32)}
    with pytest.raises(CompressionError) as err:
        decode_update(as_record(payload), global_weights, mode)
    assert message in str(err.value)


def test_the_residual_is_saved_with_the_device_state(tmp_path):
    config = FedqConfig.from_mapping({"hidden-sizes": "8", "buffer-size": 100,
                                      "batch-size": 8})
    trainer = LocalTrainer(config, seed=0)
    residual = {"0.weight": np.arange(32, dtype=np.float32).reshape(8, 4)}
    trainer.update_residual = residual
    trainer.save(tmp_path)
    restarted = LocalTrainer(config, seed=0)
    assert restarted.load(tmp_path)
    np.testing.assert_array_equal(restarted.update_residual["0.weight"], residual["0.weight"])
