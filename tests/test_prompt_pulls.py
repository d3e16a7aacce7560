"""An object pull that finds the object not stored yet retries within milliseconds, not
after Flower's 1 s first backoff, wherever a deployed round pulls objects: the ClientApp,
the ServerApp's grid, the SuperNode (common/prompt_pulls.py)."""

from __future__ import annotations

import importlib
import threading
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedq.common import prompt_pulls


def _late_store(record: ArrayRecord, delay_s: float):
    """A SuperNode object store whose objects appear ``delay_s`` after the first pull."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    first_pull: list[float] = []
    lock = threading.Lock()

    def pull(object_id: str) -> bytes:
        with lock:
            first_pull.append(time.monotonic())
            if time.monotonic() - first_pull[0] < delay_s:
                raise ObjectUnavailableError(object_id)
        return contents[object_id]

    return pull


def test_object_that_arrives_late_is_pulled_without_a_one_second_wait() -> None:
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    original = runtime.pull_and_inflate_object_from_tree
    try:
        prompt_pulls.apply(runtime)
        prompt_pulls.apply(runtime)  # idempotent: one short backoff, not a partial of one
        record = ArrayRecord([np.arange(1000, dtype=np.float32)])
        started = time.monotonic()
        pulled = runtime.pull_and_inflate_object_from_tree(
            get_object_tree(record), _late_store(record, 0.05), lambda _id: None,
            return_type=ArrayRecord)
        waited = time.monotonic() - started
    finally:
        runtime.pull_and_inflate_object_from_tree = original
    np.testing.assert_array_equal(pulled.to_numpy_ndarrays()[0], np.arange(1000))
    # Flower's default first retry alone waits 0.8-1.2 s
    assert waited < 0.5, waited


def test_servers_and_supernodes_pulls_retry_promptly_and_other_modules_are_refused() -> None:
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    supernode = importlib.import_module("flwr.supernode.start_client_internal")
    originals = {module: module.pull_objects for module in (grid, supernode)}
    record = ArrayRecord([np.arange(10, dtype=np.float32)])
    ids = list(get_all_nested_objects(record))
    try:
        for module in originals:
            prompt_pulls.apply(module)
            started = time.monotonic()
            pulled = module.pull_objects(ids, _late_store(record, 0.05))
            assert time.monotonic() - started < 0.5
            assert set(pulled) == set(ids)
    finally:
        for module, pull in originals.items():
            module.pull_objects = pull
    with pytest.raises(RuntimeError, match="no longer pulls objects"):
        prompt_pulls.apply(importlib.import_module("json"))
