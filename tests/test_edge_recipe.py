"""docs/edge-recipe.md works copied line by line: the block it shows (a SuperLink, two
``fedq-client`` devices on one host, ``fedq-submit``, watch, resume, stop) runs as one bash
script from the repository root against real Flower processes on 127.0.0.1, and leaves
a complete, resumed run and both devices' state behind. The recipe's fixed ports
(9093-9095) are swapped for free ones, so parallel test runs do not collide."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedq.simulations.flower_runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "edge-recipe.md"
DEMO = ROOT / "runs" / "edge-demo"


def recipe_block() -> str:
    """The bash block that follows the ``edge-recipe`` marker."""
    text = RECIPE.read_text()
    match = re.search(r"<!-- edge-recipe:.*?-->\n```bash\n(.*?)```", text, re.DOTALL)
    assert match, f"{RECIPE} has no marked bash block"
    return match.group(1)


def with_free_ports(block: str) -> str:
    """The recipe with each of its ports (9093 SuperLink, 9094/9095 devices) replaced by a
    port that is free now, everything else as written."""
    ports = {port: str(free_port()) for port in ("9093", "9094", "9095")}
    assert all(port in block for port in ports), "the recipe's ports changed; update the test"
    return re.sub(r"\b(9093|9094|9095)\b", lambda m: ports[m.group(1)], block)


@pytest.mark.slow
def test_the_edge_recipe_runs_as_written(tmp_path):
    shutil.rmtree(DEMO, ignore_errors=True)
    env = {**os.environ, "HOME": str(tmp_path),  # fedq-submit's ~/.flwr: not the user's
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env.pop("FLWR_HOME", None)
    script = with_free_ports(recipe_block())
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
    finally:  # whatever happened, nothing the recipe started outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    try:
        assert process.returncode == 0, output[-4000:]
        assert output.count("finished:completed") == 2, output[-4000:]
        rows = [json.loads(line) for line in (DEMO / "run" / "metrics.jsonl").open()]
        assert [row["round"] for row in rows] == [1, 2, 3, 4]  # resumed, none twice
        assert all(row["train"]["clients"] == 2 for row in rows)
        for device in ("device-1", "device-2"):
            assert (DEMO / device / "CURRENT").exists(), device
        connections = (tmp_path / ".flwr" / "config.toml").read_text()
        assert "[superlink.fedq]" in connections
    finally:
        shutil.rmtree(DEMO, ignore_errors=True)
