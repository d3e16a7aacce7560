"""Crafted ``.fqp`` files (a valid checksum over a hostile header) end in
PolicyFileError, in bounded time and memory, and never make gymnasium import a module
the file names."""

import hashlib
import json
import re
import struct
import time

import numpy as np
import pytest

from fedq.client.policy_runner import main
from fedq.common.export.policy_file import MAGIC, PolicyFileError, read_policy, write_policy

LAYERS = [(np.zeros((8, 4), np.float32), np.zeros(8, np.float32)),
          (np.zeros((2, 8), np.float32), np.zeros(2, np.float32))]


def _header_and_payload(tmp_path):
    path = tmp_path / "good.fqp"
    write_policy(path, LAYERS, env_id="CartPole-v1", variant="fp32", encoding="fp32")
    data = path.read_bytes()
    header_len = struct.unpack("<I", data[40:44])[0]
    return json.loads(data[44:44 + header_len]), data[44 + header_len:]


def _craft(path, header_bytes, payload=b"", declared_len=None):
    """A file whose checksum is right, so every check after it must hold on its own."""
    length = len(header_bytes) if declared_len is None else declared_len
    body = struct.pack("<I", length) + header_bytes + payload
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    return path


def _refused(path, match):
    started = time.perf_counter()
    with pytest.raises(PolicyFileError, match=match):
        read_policy(path)
    assert time.perf_counter() - started < 5.0


def test_an_array_of_zero_byte_dtype_is_refused(tmp_path):
    header, payload = _header_and_payload(tmp_path)
    header["arrays"][0]["dtype"] = "V0"
    header["arrays"][0]["length"] = 10**15
    _refused(_craft(tmp_path / "v0.fqp", json.dumps(header).encode(), payload),
             "'arrays' is malformed")


def test_an_infinite_array_length_is_refused(tmp_path):
    header, payload = _header_and_payload(tmp_path)
    raw = re.sub(r'"length": \d+', '"length": Infinity', json.dumps(header), count=1)
    assert "Infinity" in raw
    raw = raw.encode()
    _refused(_craft(tmp_path / "inf.fqp", raw, payload), "'arrays' is malformed")


def test_a_deeply_nested_header_is_refused(tmp_path):
    deep = b'{"format": "fedq-policy", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _refused(_craft(tmp_path / "deep.fqp", deep), "nests deeper than")
    header, payload = _header_and_payload(tmp_path)
    nested: object = 1
    for _ in range(40):  # parses fine, still too deep to hand on
        nested = {"a": nested}
    header["meta"] = nested
    _refused(_craft(tmp_path / "deep40.fqp", json.dumps(header).encode(), payload),
             "nests deeper than")


def test_a_header_length_beyond_the_file_or_the_limit_is_refused(tmp_path):
    header, payload = _header_and_payload(tmp_path)
    raw = json.dumps(header).encode()
    _refused(_craft(tmp_path / "long.fqp", raw, payload, declared_len=2**32 - 1),
             "header length 4294967295 exceeds")


@pytest.mark.parametrize("env_id", ["os:system", "json.decoder:JSONDecoder",
                                    "../CartPole-v1", "CartPole-v1\n"])
def test_an_env_id_that_is_not_a_gymnasium_id_is_refused(tmp_path, env_id, capsys):
    header, payload = _header_and_payload(tmp_path)
    header["env_id"] = env_id
    path = _craft(tmp_path / "env.fqp", json.dumps(header).encode(), payload)
    _refused(path, "header field 'env_id' .* is not a gymnasium id")
    assert main(["run", str(path), "--episodes", "1"]) == 2
    assert "not a gymnasium id" in capsys.readouterr().err
