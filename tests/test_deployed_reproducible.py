"""Two deployed runs with the same seed end with the same global model, bit for bit.

Each run starts its own real ``flower-superlink`` and the compose file's three
``fedq-supernode``s on 127.0.0.1 (so the SuperLink draws new random node ids) and
submits the same short numpy-backend run. Before replies were ordered by device key
(common/device_key.py) the server summed them in node-id order and the final weights
differed between such runs.
"""

import hashlib

import pytest
import torch

from fedq.simulations.compose_topology import TINY_RUN, compose_topology

pytestmark = pytest.mark.slow

RUN = {**TINY_RUN, "backend": "numpy", "num-server-rounds": 2, "round-timeout": 120,
       "seed": 5}


def _deployed_run(workdir) -> tuple[str, list[int]]:
    """The final checkpoint's weights hash and the node ids the run's devices had."""
    with compose_topology(workdir, node_extra={"backend": "numpy"}) as topology:
        run_dir = workdir / "run"
        assert topology.submit(run_dir, RUN, log_name="submit.log") == 0
        node_ids = sorted(node.wait_registered() for node in topology.nodes.values())
    state = torch.load(run_dir / "checkpoints" / "round-0002.pt", weights_only=False)
    weights = state.get("state_dict", state)
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].numpy().tobytes())
    return digest.hexdigest(), node_ids


def test_two_deployed_runs_with_the_same_seed_end_with_identical_weights(tmp_path):
    first, first_ids = _deployed_run(tmp_path / "first")
    second, second_ids = _deployed_run(tmp_path / "second")
    assert first_ids != second_ids  # the SuperLink drew other node ids
    assert first == second
