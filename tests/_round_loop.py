"""The server's round loop (``run_rounds``) run in-process against a stand-in federation:
the real strategy, screening, run directory and checkpoints, no SuperLink. Needs the
``server_process`` fixture (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedq.common.config import FedqConfig
from fedq.server.run_directory import RunDirectory
from fedq.server.server_app import build_strategy, initial_model, run_rounds


def run_in_process(tmp_path: Path, federation: Any, rounds: int = 1, **config: Any
                   ) -> tuple[list[dict], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``rounds`` rounds from a fresh 8-unit Q-network: (metrics rows, initial weights,
    the last checkpoint's weights)."""
    config = FedqConfig.from_mapping({"num-server-rounds": rounds, "hidden-sizes": "8",
                                      "run-dir": str(tmp_path), **config})
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    initial = {k: v.numpy().copy() for k, v in initial_model(config, None)
               .state_dict().items()}
    run_rounds(federation, build_strategy(config), config, run_dir,
               ArrayRecord(initial_model(config, None).state_dict()), first_round=1)
    final = {k: v.numpy() for k, v in run_dir.load_checkpoint(rounds)["state_dict"].items()}
    return run_dir.read_metrics(), initial, final
