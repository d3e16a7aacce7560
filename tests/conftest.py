"""Fixtures shared by the tests that drive the server's round loop in-process."""

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def server_process():
    """Instruction messages carry the sending process's identity, as in a ServerApp."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
