"""Whether Compose v1 (the `docker-compose` 1.29 Debian ships, which these machines run)
accepts the project's compose file merged with override files: one check for every test
that writes an override, so they all hold the file to the same Compose."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fedq.simulations.compose_topology import COMPOSE
from fedq.simulations.docker_engine import ROOT


def assert_compose_v1_accepts(*overrides: Path) -> None:
    """`docker-compose config -q` on the compose file plus ``overrides`` exits 0 (skipped
    silently where Compose v1 is not installed: the YAML checks around it still run)."""
    if not shutil.which("docker-compose"):
        return
    files = [arg for path in (COMPOSE, *overrides) for arg in ("-f", str(path))]
    done = subprocess.run(["docker-compose", "-p", "x", *files, "config", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
