"""An object pull that finds the object not stored yet retries within milliseconds, not
after Flower's 1 s first backoff, wherever a deployed round pulls objects: the ClientApp,
the ServerApp's grid, the SuperNode (common/prompt_pulls.py).

The tests read the retry schedule itself (the waits Flower's ``pull_objects`` asks for),
not the wall time of a pull, so a loaded machine cannot fail them; without the fix the
first wait is Flower's 0.8-1.2 s."""

from __future__ import annotations

import importlib
import threading
import time
import types

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedq.common import prompt_pulls

# the first retry wait with the fix: INITIAL_BACKOFF_S plus Flower's +-20% jitter
PROMPT_FIRST_WAIT_S = prompt_pulls.INITIAL_BACKOFF_S * 1.2


@pytest.fixture
def retry_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds each retry of ``pull_objects`` waits (``early_stop.wait``), recorded
    by giving Flower's module an Event that notes its waits before waiting them."""
    waits: list[float] = []

    class RecordingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            if timeout is not None:
                waits.append(timeout)
            return super().wait(timeout)

    fake = types.SimpleNamespace(Lock=threading.Lock, Event=RecordingEvent)
    monkeypatch.setattr(inflatable_utils, "threading", fake)
    return waits


def _late_store(record: ArrayRecord):
    """A SuperNode object store that has none of the objects at the first pull of each
    (they are still being pushed) and all of them at the second."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    tried: set[str] = set()
    lock = threading.Lock()

    def pull(object_id: str) -> bytes:
        with lock:
            if object_id not in tried:
                tried.add(object_id)
                raise ObjectUnavailableError(object_id)
        return contents[object_id]

    return pull


def test_object_that_arrives_late_is_pulled_without_a_one_second_wait(
        retry_waits: list[float]) -> None:
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    original = runtime.pull_and_inflate_object_from_tree
    try:
        prompt_pulls.apply(runtime)
        prompt_pulls.apply(runtime)  # idempotent: one short backoff, not a partial of one
        record = ArrayRecord([np.arange(1000, dtype=np.float32)])
        pulled = runtime.pull_and_inflate_object_from_tree(
            get_object_tree(record), _late_store(record), lambda _id: None,
            return_type=ArrayRecord)
    finally:
        runtime.pull_and_inflate_object_from_tree = original
    np.testing.assert_array_equal(pulled.to_numpy_ndarrays()[0], np.arange(1000))
    # one retry per object, each after the short wait (Flower's default: 0.8-1.2 s)
    assert retry_waits and max(retry_waits) <= PROMPT_FIRST_WAIT_S, retry_waits


def test_servers_and_supernodes_pulls_retry_promptly_and_other_modules_are_refused(
        retry_waits: list[float]) -> None:
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    supernode = importlib.import_module("flwr.supernode.start_client_internal")
    originals = {module: module.pull_objects for module in (grid, supernode)}
    record = ArrayRecord([np.arange(10, dtype=np.float32)])
    ids = list(get_all_nested_objects(record))
    try:
        for module in originals:
            prompt_pulls.apply(module)
            retry_waits.clear()
            pulled = module.pull_objects(ids, _late_store(record))
            assert set(pulled) == set(ids)
            assert retry_waits and max(retry_waits) <= PROMPT_FIRST_WAIT_S, (module, retry_waits)
    finally:
        for module, pull in originals.items():
            module.pull_objects = pull
    with pytest.raises(RuntimeError, match="no longer pulls objects"):
        prompt_pulls.apply(importlib.import_module("json"))


def test_a_clientapp_gives_up_a_message_whose_objects_never_arrive(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A message stored without its objects (a run stopped while the SuperNode received
    it) once kept its ClientApp retrying for up to ~80 minutes before any fedq code ran;
    bounded (client/clientapp_launcher.py), Flower's own pull raises after the limit and
    the log says why."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    from fedq.client import clientapp_launcher

    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    record = ArrayRecord([np.arange(10, dtype=np.float32)])

    def never_stored(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    def pull_task_input(_client: object) -> object:  # Flower's, reduced to its object pull
        return runtime.pull_and_inflate_object_from_tree(
            get_object_tree(record), never_stored, lambda _id: None, return_type=ArrayRecord)

    monkeypatch.setattr(runtime, "pull_task_input", pull_task_input)
    monkeypatch.setattr(runtime, "pull_and_inflate_object_from_tree",
                        runtime.pull_and_inflate_object_from_tree)
    monkeypatch.setattr(clientapp_launcher, "MESSAGE_PULL_RANGE_S", (0.1, 7200.0))  # fast
    clientapp_launcher.bound_message_pull(
        runtime, {clientapp_launcher.MESSAGE_PULL_ENV: "0.3"})
    clientapp_launcher.bound_message_pull(runtime, {})  # idempotent: the first limit holds
    assert runtime.pull_and_inflate_object_from_tree.keywords == {
        "initial_backoff": prompt_pulls.INITIAL_BACKOFF_S, "max_time": 0.3}
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="flwr"), pytest.raises(ObjectPullError):
        runtime.pull_task_input(None)
    assert time.monotonic() - started < 5  # Flower's default: up to 2 hours
    assert clientapp_launcher.MESSAGE_PULL_ENV in caplog.text
    assert "gives the task up" in caplog.text


@pytest.mark.parametrize("raw", ["soon", "0", "-3", "nan", "9000"])
def test_a_bad_message_pull_limit_is_refused_naming_the_variable(raw: str) -> None:
    from fedq.client.clientapp_launcher import (
        DEFAULT_MESSAGE_PULL_S,
        MESSAGE_PULL_ENV,
        message_pull_limit,
    )

    with pytest.raises(ValueError, match=rf"{MESSAGE_PULL_ENV}='{raw}'.*\[5, 7200\]"):
        message_pull_limit({MESSAGE_PULL_ENV: raw})
    assert message_pull_limit({}) == DEFAULT_MESSAGE_PULL_S
