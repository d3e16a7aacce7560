"""Weights cross the network as Flower ArrayRecords; what arrives is checked before it
touches a model."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedq.common.networks import QNetwork
from fedq.common.weights import WeightsError, to_record, to_state_dict


def test_round_trip_is_exact():
    torch.manual_seed(0)
    net = QNetwork(4, 2, (8, 8))
    restored = to_state_dict(to_record(net), QNetwork(4, 2, (8, 8)))
    for name, tensor in net.state_dict().items():
        assert torch.equal(restored[name], tensor)


def test_record_survives_flower_wire_serialisation():
    """Deflate to bytes and inflate back, as a message does between SuperLink and node."""
    net = QNetwork(3, 2, (5,))
    record = to_record(net)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    received = inflate_object_from_contents(record.object_id, contents)
    restored = to_state_dict(received, QNetwork(3, 2, (5,)))
    for name, tensor in net.state_dict().items():
        assert torch.equal(restored[name], tensor)


def _record_with(net, name, array):
    arrays = {k: Array(v.numpy()) for k, v in net.state_dict().items()}
    arrays[name] = Array(array)
    return ArrayRecord(arrays)


def test_wrong_shape_names_the_tensor():
    net = QNetwork(4, 2, (8,))
    with pytest.raises(WeightsError, match=r"'0.weight' has shape"):
        to_state_dict(_record_with(net, "0.weight", np.zeros((9, 4), np.float32)), net)


def test_nan_is_refused():
    net = QNetwork(4, 2, (8,))
    bad = np.full((8,), np.nan, dtype=np.float32)
    with pytest.raises(WeightsError, match=r"'0.bias' contains NaN"):
        to_state_dict(_record_with(net, "0.bias", bad), net)


def test_integer_dtype_is_refused():
    net = QNetwork(4, 2, (8,))
    with pytest.raises(WeightsError, match="dtype int64"):
        to_state_dict(_record_with(net, "0.bias", np.zeros(8, np.int64)), net)


def test_missing_and_extra_tensors_are_listed():
    net = QNetwork(4, 2, (8,))
    record = to_record(QNetwork(4, 2, (8, 8)))
    with pytest.raises(WeightsError, match=r"unexpected \['4.bias', '4.weight'\]"):
        to_state_dict(record, net)
