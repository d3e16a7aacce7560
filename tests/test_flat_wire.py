"""The flat wire format (common/flat_wire.py): a message's Q-network weights cross the
network as one flat array, so a deployed hop moves 7 Flower objects instead of 16; what
the device and the server work on afterwards must be the very tensors that were sent,
and a layout that does not describe its array must be refused naming the field."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _replies import as_numpy, device_context, instruction, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedq.client.client_app import app
from fedq.client.flat_wire_mod import flat_wire_mod
from fedq.common import flat_wire
from fedq.common.config import FedqConfig
from fedq.common.flat_wire import FLAT_KEY, LAYOUT_RECORD, WireFormatError
from fedq.common.networks import QNetwork
from fedq.server.prompt_grid import WIRE_FORMAT_ERROR_CODE, PromptGrid

SMALL = {"hidden-sizes": "16,16", "buffer-size": 600, "batch-size": 16,
         "learning-starts": 100, "target-update-interval": 50, "exploration-steps": 500,
         "local-steps": 200, "eval-episodes": 1}


def _weights(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(QNetwork(4, 2, (64, 64)).state_dict())


def _packed(seed: int = 0) -> RecordDict:
    return flat_wire.pack(RecordDict({"arrays": _weights(seed),
                                      "config": ConfigRecord({"server-round": 1})}))


def _bits(record: ArrayRecord) -> dict[str, tuple]:
    return {k: (a.shape, a.dtype, a.tobytes()) for k, a in as_numpy(record).items()}


def test_packed_weights_round_trip_bit_for_bit_in_one_array():
    weights = _weights()
    first = weights["0.weight"].numpy().copy()
    first[0, :3] = [np.nan, -0.0, np.float32(1e-45)]  # NaN, signed zero, a subnormal
    weights["0.weight"] = Array(first)
    weights["scalar"] = Array(np.array(3.5, np.float32))  # rank 0 travels too
    content = flat_wire.pack(RecordDict({"arrays": weights}))
    assert list(content["arrays"]) == [FLAT_KEY]
    assert content["arrays"][FLAT_KEY].numpy().shape == (4610 + 1,)
    restored = flat_wire.unpack(content)
    assert list(restored) == ["arrays"]  # the layout record is gone
    assert list(restored["arrays"]) == list(weights)  # same names, same order
    assert _bits(restored["arrays"]) == _bits(weights)


def test_a_train_message_is_seven_objects_instead_of_sixteen():
    """What the format is for: each Flower object is one gRPC call per hop."""
    def objects(content: RecordDict) -> int:
        return len(get_all_nested_objects(instruction(0, "train", content)))

    plain = RecordDict({"arrays": _weights(), "config": ConfigRecord({"server-round": 1})})
    assert objects(plain) == 16
    assert objects(flat_wire.pack(plain)) == 7


def test_records_that_gain_nothing_travel_as_they_are():
    int8 = ArrayRecord({"delta-int8": Array(np.zeros(8, np.int8)),  # update compression
                        "delta-scales": Array(np.ones(2, np.float16))})
    single = ArrayRecord({"delta-fp16": Array(np.zeros(8, np.float16))})
    for record in (int8, single, ArrayRecord()):
        content = RecordDict({"arrays": record})
        assert flat_wire.pack(content) is content
        assert flat_wire.unpack(content) is content


def _corrupt(field: str, value) -> RecordDict:
    content = _packed()
    content[LAYOUT_RECORD][field] = value
    return content


@pytest.mark.parametrize(("content", "field"), [
    (_corrupt("arrays.shapes", [64, 4, 64, 64, 64, 64, 2, 64, 3]), "arrays.shapes"),
    (_corrupt("arrays.shapes", [64, 4, 64, 64, 64, 64, 2, 64]), "arrays.shapes"),
    (_corrupt("arrays.ranks", [2, 1, 2, 1, 2]), "arrays.ranks"),
    (_corrupt("arrays.names", ["0.weight"] * 6), "arrays.names"),
    (_corrupt("arrays.names", "0.weight"), "arrays.names"),
    (_corrupt("arrays.dtype", "float64"), "arrays.dtype"),
    (_corrupt("arrays.extra", 1), "arrays.extra"),
])
def test_a_malformed_layout_is_refused_naming_the_field(content, field):
    with pytest.raises(WireFormatError, match=f"'{field}'"):
        flat_wire.unpack(content)


def test_a_flat_array_that_is_not_one_1d_array_is_refused_naming_the_record():
    content = _packed()
    content["arrays"] = ArrayRecord({FLAT_KEY: Array(np.zeros((2, 2305), np.float32))})
    with pytest.raises(WireFormatError, match=r"field 'arrays'.*1-D"):
        flat_wire.unpack(content)
    del content["arrays"]
    with pytest.raises(WireFormatError, match="field 'arrays'"):
        flat_wire.unpack(content)


def test_the_device_answers_in_the_form_it_was_asked():
    seen = {}

    def handler(msg: Message, _context) -> Message:
        seen["arrays"] = msg.content["arrays"]
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    context = device_context(0, {})
    answer = flat_wire_mod(instruction(0, "train", _packed()), context, handler)
    assert _bits(seen["arrays"]) == _bits(_weights())  # the handler saw the tensors
    assert flat_wire.is_packed(answer.content)  # and its reply left packed
    assert _bits(flat_wire.unpack(answer.content)["arrays"]) == _bits(_weights())
    plain = instruction(0, "train", RecordDict({"arrays": _weights()}))
    assert not flat_wire.is_packed(flat_wire_mod(plain, context, handler).content)


def test_the_real_client_app_trains_on_a_packed_message_and_replies_packed(tmp_path: Path):
    run_config = {**FedqConfig().to_mapping(), **SMALL, "run-dir": str(tmp_path)}
    torch.manual_seed(0)
    sent = ArrayRecord(QNetwork(4, 2, (16, 16)).state_dict())
    msg = instruction(0, "train", flat_wire.pack(RecordDict(
        {"arrays": sent, "config": ConfigRecord({"local-steps": 200})})))
    answer = app(msg, device_context(0, run_config))
    assert not answer.has_error(), answer.error.reason if answer.has_error() else ""
    assert flat_wire.is_packed(answer.content)
    trained = flat_wire.unpack(answer.content)["arrays"]
    assert {k: a.shape for k, a in as_numpy(trained).items()} == \
        {k: a.shape for k, a in as_numpy(sent).items()}
    assert any(not np.array_equal(as_numpy(trained)[k], as_numpy(sent)[k]) for k in sent)


class _Link:
    """A grid that answers every pushed message with the replies it is given."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies, self.pushed = replies, []

    def push_messages(self, messages):
        self.pushed += list(messages)
        return [r.metadata.reply_to_message_id for r in self.replies]

    def pull_messages(self, ids):
        return [r for r in self.replies if r.metadata.reply_to_message_id in ids]


def test_the_server_sends_packed_and_refuses_a_reply_whose_layout_does_not_fit():
    good = reply(1, _weights(1))
    good.content = flat_wire.pack(good.content)
    bad = reply(2, _weights(2))
    bad.content = flat_wire.pack(bad.content)
    bad.content[LAYOUT_RECORD]["arrays.dtype"] = "int8"
    link = _Link([good, bad])
    train = instruction(0, "train", RecordDict({"arrays": _weights()}))
    replies = PromptGrid(link).send_and_receive([train], timeout=5)
    assert flat_wire.is_packed(link.pushed[0].content)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert _bits(by_node[1].content["arrays"]) == _bits(_weights(1))
    assert by_node[2].has_error() and by_node[2].error.code == WIRE_FORMAT_ERROR_CODE
    assert "device 2" in by_node[2].error.reason
    assert "'arrays.dtype'" in by_node[2].error.reason
    assert by_node[2].metadata.reply_to_message_id == "i2"  # still answers its message



def test_with_flat_wire_off_the_server_sends_tensor_by_tensor():
    """Run config ``flat-wire = false``: for devices whose fedq cannot unpack."""
    link = _Link([])
    train = instruction(0, "train", RecordDict({"arrays": _weights()}))
    PromptGrid(link, flat_wire=False).push_messages([train])
    assert not flat_wire.is_packed(link.pushed[0].content)
    assert _bits(link.pushed[0].content["arrays"]) == _bits(_weights())
