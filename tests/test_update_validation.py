"""Every kind of bad update is rejected before aggregation, with a WARNING that names the
node and the reason, and never reaches the global model; good updates, error replies and
compressed updates get through; and the validation keys are checked with the field named."""

import logging

import numpy as np
import pytest
from _replies import as_numpy, error_reply, reply, train_metrics
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedq.common.compression import encode_update, payload_bytes
from fedq.common.config import ConfigError, FedqConfig
from fedq.server.update_validation import screen_replies

RNG = np.random.default_rng(0)
GLOBAL = {"0.weight": RNG.normal(size=(8, 4)).astype(np.float32),
          "0.bias": np.zeros(8, np.float32)}
GLOBAL_RECORD = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def _honest(node, step=0.01, seed=None):
    rng = np.random.default_rng(seed if seed is not None else node)
    return reply(node, {k: (g + step * rng.normal(size=g.shape)).astype(np.float32)
                        for k, g in GLOBAL.items()})


def _with(node, changes):
    """A small honest-looking update with some tensors replaced (None: left out)."""
    weights = {k: g + 0.01 for k, g in GLOBAL.items()}
    for name, value in changes.items():
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    return reply(node, weights)


def _bad_weight(value):
    w = GLOBAL["0.weight"].copy()
    w[3, 1] = value
    return w


BAD = {  # kind: (a fresh bad reply from node 9, the reason it must be rejected for)
    "nan": (lambda: _with(9, {"0.weight": _bad_weight(np.nan)}), "contains NaN or Inf"),
    "inf": (lambda: _with(9, {"0.weight": _bad_weight(np.inf)}), "contains NaN or Inf"),
    "shape": (lambda: _with(9, {"0.bias": np.zeros(7, np.float32)}),
              "has shape [7], expected [8]"),
    "dtype": (lambda: _with(9, {"0.bias": np.zeros(8, np.float64)}),
              "dtype float64, expected float32"),
    "missing key": (lambda: _with(9, {"0.bias": None}), "missing ['0.bias']"),
    "extra key": (lambda: _with(9, {"1.bias": np.zeros(2, np.float32)}), "unexpected ['1.bias']"),
    "huge norm": (lambda: _honest(9, step=5.0), "exceeds 10 x the round's median update norm"),
    "zero weight": (lambda: reply(9, GLOBAL, train_metrics(num_examples=0)), "'num-examples' is 0"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_update_is_rejected_with_its_reason(kind, caplog):
    make_bad, reason = BAD[kind]
    replies = [_honest(1), _honest(2), _honest(3), make_bad()]
    with caplog.at_level(logging.WARNING):
        screening = screen_replies(replies, GLOBAL_RECORD, FedqConfig(), server_round=4)
    assert [m.metadata.src_node_id for m in screening.replies] == [1, 2, 3]
    assert list(screening.rejected) == [9] and reason in screening.rejected[9]
    row = screening.row()
    assert row["rejected"] == 1 and row["rejected-nodes"] == [9]
    assert any("round 4" in r.message and "node 9" in r.message and reason in r.message
               for r in caplog.records if r.levelno == logging.WARNING)


def test_a_rejected_update_never_reaches_the_global_model():
    honest = [_honest(1), _honest(2), _honest(3)]
    expected, _ = FedAvg().aggregate_train(1, [_honest(1), _honest(2), _honest(3)])
    screening = screen_replies([*honest, BAD["nan"][0]()], GLOBAL_RECORD, FedqConfig(), 1)
    arrays, _ = FedAvg().aggregate_train(1, screening.replies)
    for name, value in as_numpy(expected).items():
        np.testing.assert_array_equal(as_numpy(arrays)[name], value)


def test_without_validation_bad_updates_pass_through_to_the_strategy():
    config = FedqConfig(validate_updates=False)
    screening = screen_replies([_honest(1), _honest(2), BAD["nan"][0]()], GLOBAL_RECORD,
                               config, 1)
    assert len(screening.replies) == 3 and not screening.rejected
    arrays, _ = FedAvg().aggregate_train(1, screening.replies)
    assert np.isnan(as_numpy(arrays)["0.weight"][3, 1])  # what validation prevents


def test_the_norm_check_needs_three_updates_and_spares_similar_ones():
    # two replies: no meaningful median, so no norm rejection
    screening = screen_replies([_honest(1), _honest(2, step=5.0)], GLOBAL_RECORD,
                               FedqConfig(), 1)
    assert not screening.rejected
    # honest updates of different size within the factor are all kept
    replies = [_honest(1, 0.01), _honest(2, 0.03), _honest(3, 0.05), _honest(4, 0.002)]
    assert not screen_replies(replies, GLOBAL_RECORD, FedqConfig(), 1).rejected


def test_error_replies_pass_through_for_the_strategy_to_skip():
    screening = screen_replies([_honest(1), error_reply(2)], GLOBAL_RECORD, FedqConfig(), 1)
    assert sorted(m.metadata.src_node_id for m in screening.replies) == [1, 2]
    assert not screening.rejected and list(screening.upload_bytes) == [1]


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_compressed_updates_are_reconstructed_then_validated(mode):
    config = FedqConfig(update_compression=mode)
    local = {k: g + 0.02 for k, g in GLOBAL.items()}
    payload, _ = encode_update(local, GLOBAL, {}, mode)
    nan_payload, _ = encode_update({k: np.full_like(g, np.nan) for k, g in GLOBAL.items()},
                                   GLOBAL, {}, mode)
    replies = [reply(1, payload), reply(2, payload), reply(3, nan_payload),
               reply(4, {"junk": np.zeros(3, np.int8)})]
    screening = screen_replies(replies, GLOBAL_RECORD, config, 1)
    assert [m.metadata.src_node_id for m in screening.replies] == [1, 2]
    assert "NaN" in screening.rejected[3] and "does not decode" in screening.rejected[4]
    restored = as_numpy(screening.replies[0].content["arrays"])
    for name, value in local.items():
        np.testing.assert_allclose(restored[name], value, atol=1e-3)
    assert screening.upload_bytes[1] < payload_bytes(GLOBAL_RECORD)


@pytest.mark.parametrize(("mapping", "key", "message"), [
    ({"update-norm-factor": 0.5}, "update-norm-factor", "must be >= 1"),
    ({"update-compression": "int4"}, "update-compression", "one of"),
    ({"validate-updates": "no"}, "validate-updates", "true or false"),
])
def test_validation_and_compression_keys_are_checked_naming_the_field(mapping, key, message):
    with pytest.raises(ConfigError, match=f"config field '{key}'") as err:
        FedqConfig.from_mapping(mapping)
    assert message in str(err.value)
