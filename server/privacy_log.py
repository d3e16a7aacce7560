"""The server's record of every device's privacy position: ``<run-dir>/privacy.jsonl``.

Each DP device's train reply carries its lifetime (epsilon, delta) and the Opacus
accountant segments (noise multiplier, sample rate, steps) this round added
(:func:`client.client_app._privacy_metrics`). Written down round by round, those segments
let anyone recompute a device's epsilon with Opacus's accountant, independently of what
the device claimed, and show how each device's budget was spent. A device that declines a
round for its budget (error code ``PRIVACY_BUDGET_ERROR_CODE``) gets a row with its reason,
and the round goes on with the others; the round's ``metrics.jsonl`` row counts them.

One JSON object per line::

    {"round": 3, "node-id": 81..., "partition-id": 0, "status": "trained",
     "dp-epsilon": 2.1, "dp-delta": 1e-05, "dp-noise-multiplier": 1.0,
     "dp-sample-rate": 0.004, "dp-steps-total": 7500, "dp-round-noise-multipliers": [1.0],
     "dp-round-sample-rates": [0.004], "dp-round-steps": [2500]}
    {"round": 4, "node-id": 81..., "status": "declined", "reason": "privacy budget: ..."}

A device that refuses a message its privacy policy does not allow (error code
``PRIVACY_POLICY_ERROR_CODE``, :mod:`common.privacy_policy`: a run config that switches
DP off or lowers the noise, an evaluate message asking a DP device to fine-tune) gets a
row with status ``refused``, its phase and its reason, logged at WARNING.

Devices without DP (``dp-enabled`` 0) have nothing to account and get no row. Like
``clients.jsonl``, rows are written before the round's ``metrics.jsonl`` row, and a resumed
server moves the rows of the rounds it is about to repeat, and any line it cannot read (a
torn append, a damaged file), to ``privacy.superseded.jsonl`` with a warning: a device's
recorded epsilon is never dropped silently (issue 16).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from fedq.common.atomic import atomic_write_text
from fedq.common.privacy import PRIVACY_BUDGET_ERROR_CODE
from fedq.common.privacy_policy import PRIVACY_POLICY_ERROR_CODE

FILE_NAME = "privacy.jsonl"
SUPERSEDED_FILE_NAME = "privacy.superseded.jsonl"
_KEYS = ("partition-id", "dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate",
         "dp-steps-total", "dp-round-noise-multipliers", "dp-round-sample-rates",
         "dp-round-steps")


def privacy_rows(server_round: int, replies: Iterable[Message],
                 phase: str = "train") -> list[dict[str, Any]]:
    """The log rows of one round's ``phase`` replies: DP devices that trained or
    declined, and devices whose privacy policy refused the message."""
    rows = []
    for msg in replies:
        row: dict[str, Any] = {"round": server_round, "node-id": msg.metadata.src_node_id}
        if msg.has_error():
            if msg.error.code == PRIVACY_BUDGET_ERROR_CODE:
                rows.append({**row, "status": "declined", "reason": msg.error.reason})
            elif msg.error.code == PRIVACY_POLICY_ERROR_CODE:
                rows.append({**row, "status": "refused", "phase": phase,
                             "reason": msg.error.reason})
            continue
        if phase != "train":
            continue
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is None or not metrics.get("dp-enabled"):
            continue
        rows.append({**row, "status": "trained",
                     **{k: _plain(metrics[k]) for k in _KEYS if k in metrics}})
    return rows


class PrivacyLog:
    """Appends each round's privacy rows to ``privacy.jsonl`` and logs declined devices."""

    def __init__(self, run_root: Path, first_round: int) -> None:
        """Open the log of a run that continues at ``first_round``: rows of later rounds
        and unreadable lines move to ``privacy.superseded.jsonl`` (kept, not deleted)."""
        self.path = run_root / FILE_NAME
        if not self.path.exists():
            if first_round > 1 and _had_private_devices(run_root / "clients.jsonl"):
                log(logging.WARNING, "[fedq] %s is missing, though clients.jsonl shows DP "
                    "devices before round %d: the server's record of their epsilon is lost "
                    "(each device's own privacy.json still holds it); resuming without it",
                    self.path, first_round)
            return
        kept, later, torn = [], [], []
        for line in self.path.read_text(errors="replace").splitlines():
            done = _round_of(line)
            (torn if done is None else kept if done < first_round else later).append(line)
        torn = [line for line in torn if line.strip()]
        if not later and not torn:
            return
        now = time.time()
        moved = [json.dumps({**json.loads(line), "superseded-at": now}) for line in later]
        moved += [json.dumps({"torn-line": line, "superseded-at": now}) for line in torn]
        with open(run_root / SUPERSEDED_FILE_NAME, "a") as fh:
            fh.write("".join(line + "\n" for line in moved))
            fh.flush()
            os.fsync(fh.fileno())
        if torn:
            log(logging.WARNING, "[fedq] %s: %d unreadable line(s) (torn or damaged) moved to "
                "%s as they were (what was readable of them is kept; each device's own ledger "
                "still holds its epsilon)", self.path, len(torn),
                SUPERSEDED_FILE_NAME)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def record(self, server_round: int, replies: list[Message],
               phase: str = "train") -> dict[str, Any]:
        """Append the round's rows of one phase; return its entries for the round's
        ``privacy`` in metrics.jsonl (how many devices declined for their budget or
        refused for their policy, and which)."""
        rows = privacy_rows(server_round, replies, phase)
        declined = {r["node-id"]: r["reason"] for r in rows if r["status"] == "declined"}
        refused = {r["node-id"]: r["reason"] for r in rows if r["status"] == "refused"}
        for node, reason in sorted(declined.items()):
            log(logging.WARNING, "[fedq] round %d: node %d declined to train: %s",
                server_round, node, reason)
        for node, reason in sorted(refused.items()):
            log(logging.WARNING, "[fedq] round %d: node %d refused the %s message: %s",
                server_round, node, phase, reason)
        if rows:
            with open(self.path, "a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows))
                fh.flush()
                os.fsync(fh.fileno())
        if phase != "train":
            return {f"{phase}-refused": len(refused), f"{phase}-refused-nodes": sorted(refused)}
        return {"declined": len(declined), "declined-nodes": sorted(declined),
                "refused": len(refused), "refused-nodes": sorted(refused)}


def read_privacy_log(run_root: Path) -> list[dict[str, Any]]:
    """Every row of a run's ``privacy.jsonl`` (empty if no DP device ever replied)."""
    path = run_root / FILE_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _plain(value: Any) -> Any:
    """Metric values as JSON: lists stay lists, inf (no finite epsilon) becomes null."""
    if isinstance(value, list):
        return list(value)
    return None if isinstance(value, float) and value == float("inf") else value


def _had_private_devices(clients_log: Path) -> bool:
    """Whether any reply in ``clients.jsonl`` came from a device with DP on."""
    if not clients_log.exists():
        return False
    return any('"dp-enabled": 1' in line or '"dp-enabled": true' in line
               for line in clients_log.read_text(errors="replace").splitlines())


def _round_of(line: str) -> int | None:
    try:
        row = json.loads(line)
        return int(row["round"]) if isinstance(row, dict) else None
    except (ValueError, KeyError, TypeError, RecursionError):  # torn by a crash, or damaged
        return None
