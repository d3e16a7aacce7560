"""SecAgg+ on real processes: a deployment SuperLink and three ``flower-supernode``
processes on 127.0.0.1, each device's privacy policy requiring secure aggregation
(``privacy-require-secagg``), the probed app of tests/_probe_app.py. The round trains
through SecAgg+ (no device refuses), the released model is FedAvg of what the devices
trained within one quantisation level, and no reply the ServerApp pulled from the
SuperLink carries an array."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _probe_app import probe_app
from _uniform import looks_uniform

from fedq.server.run_directory import RunDirectory
from fedq.simulations.compose_topology import TINY_RUN
from fedq.simulations.flower_runtime import deployment_superlink, start_supernode, submit_run
from fedq.simulations.run import APP_DIR

pytestmark = pytest.mark.slow
LEVEL = 2 * 8.0 / 4194304


def test_secure_aggregation_between_real_supernodes(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "probe"
    with tempfile.TemporaryDirectory(prefix="fedq-secagg-") as workdir, \
            deployment_superlink(tmp_path / "link") as link:
        nodes = [start_supernode(link, tmp_path / f"node-{i}", {
            "state-dir": str(tmp_path / f"state-{i}"), "privacy-require-secagg": True},
            name=f"device-{i}") for i in range(3)]
        node_ids = [node.wait_registered(120) for node in nodes]
        result = submit_run(link, probe_app(APP_DIR, Path(workdir), out), stream=False,
                            timeout=400, log_path=tmp_path / "run.log", run_config={
                                **TINY_RUN, "num-server-rounds": 1, "round-timeout": 120,
                                "backend": "numpy",  # a ClientApp process per message
                                "min-available-clients": 3, "run-dir": str(run_dir),
                                "validate-updates": False, "secure-aggregation": True})
    assert result.ok, result.output[-3000:]
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["train"]["clients"] == 3 and row["train"]["secagg-masked-devices"] == 3
    assert row["device-failures"] == []
    saved = [np.load(out / f"plain-{node}.npz") for node in node_ids]
    names = [k[len("global."):] for k in saved[0].files if k.startswith("global.")]

    def flat(npz, prefix):
        return np.concatenate([npz[prefix + n].astype(np.float64).ravel() for n in names])

    start = flat(saved[0], "global.")
    fedavg = sum(float(s["weight"]) * (flat(s, "trained.") - start) for s in saved) / \
        sum(float(s["weight"]) for s in saved)
    state = RunDirectory(run_dir).load_checkpoint(1)["state_dict"]
    released = np.concatenate([state[n].numpy().astype(np.float64).ravel() for n in names])
    assert np.max(np.abs(released - start - fedavg)) <= LEVEL + 1e-6
    received = [json.loads(line) for line in
                (out / "server-received.jsonl").read_text().splitlines()]
    assert received and all(r["array-elements"] == 0 for r in received)
    masked = [m for r in received for m in r["masked"]]
    assert len(masked) == 3
    assert all(looks_uniform(mean, std, size) for mean, std, size in masked), masked
