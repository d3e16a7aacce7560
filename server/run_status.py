"""A Flower run's final status, read from ``flwr ls``.

``flwr run --stream`` exits 0 even when the ServerApp raised; only the run status
(``finished:completed`` / ``finished:failed``) in ``flwr ls`` tells. Both the server's
``fedq-submit`` and the simulation runner (:mod:`simulations.flower_runtime`) read it
this way, so the helper lives on the server side, which simulations may import.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def poll_run_status(list_run: Callable[[], str],
                    attempts: int) -> tuple[str | None, str | None]:
    """(status, details) from the output of ``flwr ls --run-id ID --format json``, which
    ``list_run`` returns; polled up to ``attempts`` times a second apart, since the log
    stream can end a moment before the status turns final."""
    status: str | None = None
    details: str | None = None
    for _ in range(attempts):
        try:
            output = list_run()
        except subprocess.TimeoutExpired:
            return status, "flwr ls timed out"
        try:
            run = json.loads(_ANSI.sub("", output))["runs"][0]
        except (ValueError, KeyError, IndexError):
            return None, output.strip() or None
        status, details = run.get("status"), run.get("status-details")
        if status is not None and status.startswith("finished"):
            break
        time.sleep(1.0)
    return status, details
