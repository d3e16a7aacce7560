"""Honest outcomes: each round's device failures by name, and the run's final status.

Flower's error replies for a device the SuperLink gave up on come from the SuperLink
(source node id 1), not from the device; the device they concern is the destination of
the message they answer (``reply_to_message_id``). :func:`replying_node` maps them back,
so ``clients.jsonl`` and ``metrics.jsonl`` name the real node and, once it has been
heard from, its simulation partition. A device that sent nothing by ``round-timeout``
is a failure too ("no reply").

A round *failed* when devices were asked to train, none of their updates was accepted,
and at least one failed for a reason other than its privacy budget (a device that
declines for its budget does what it was configured to). The run's status, written to
``status.json`` and logged as ``[fedq] run status: ...``:

- ``ok``: no device failure in any round (a privacy-budget decline is not one);
- ``degraded``: failures, but at most ``failed-rounds-threshold`` of the rounds failed;
- ``failed``: more rounds failed than that; the ServerApp then raises
  :class:`RunFailedError`, so Flower ends the run ``finished:failed`` and
  ``fedq-simulate`` / ``fedq-submit`` exit 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedq.common.atomic import atomic_write_text
from fedq.common.privacy import PRIVACY_BUDGET_ERROR_CODE

STATUS_FILE = "status.json"
STATUS_PREFIX = "[fedq] run status:"
_STATUS_LINE = re.compile(re.escape(STATUS_PREFIX) + r" (ok|degraded|failed)\b(.*)")
NO_REPLY = "no reply within round-timeout"
NO_REPLY_CODE = -1
REJECTED_CODE = -2  # an update screening refused (server/update_validation.py)


class RunFailedError(RuntimeError):
    """Too many rounds failed for the run to count as completed."""


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of messages already sent (Flower's grids set the
    id of each message they push)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages
            if m.metadata.message_id}


def replying_node(msg: Message, destinations: Mapping[str, int]) -> int:
    """The device a reply concerns: the node its request went to, else its sender."""
    return destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def phase_failures(phase: str, destinations: Mapping[str, int], replies: Sequence[Message],
                   partitions: Mapping[int, int]) -> list[dict[str, Any]]:
    """One entry per device of the phase that replied with an error or not at all."""
    failures = []
    answered = set()
    for msg in replies:
        node = replying_node(msg, destinations)
        answered.add(msg.metadata.reply_to_message_id)
        if msg.has_error():
            failures.append({"phase": phase, "node-id": node,
                             "partition-id": partitions.get(node, -1),
                             "code": int(msg.error.code), "error": str(msg.error.reason)})
    for message_id, node in destinations.items():
        if message_id not in answered:
            failures.append({"phase": phase, "node-id": node,
                             "partition-id": partitions.get(node, -1), "code": NO_REPLY_CODE,
                             "error": NO_REPLY})
    return failures


def round_failed(failures: Sequence[dict[str, Any]], sampled: int, accepted: int) -> bool:
    """Devices were asked to train, none was accepted, and not only for their budget."""
    train = [f for f in failures if f["phase"] == "train"]
    return (sampled > 0 and accepted == 0
            and any(f["code"] != PRIVACY_BUDGET_ERROR_CODE for f in train))


@dataclass(frozen=True)
class RunOutcome:
    """The run's status and why."""

    status: str
    rounds: int
    failed_rounds: list[int]
    device_failures: int
    threshold: float

    def line(self) -> str:
        return (f"{STATUS_PREFIX} {self.status} ({len(self.failed_rounds)} of {self.rounds} "
                f"rounds failed: {self.failed_rounds[:20]}; {self.device_failures} device "
                f"failure(s); failed-rounds-threshold {self.threshold})")


def run_outcome(rows: Sequence[dict[str, Any]], threshold: float) -> RunOutcome:
    """The status of a run from its ``metrics.jsonl`` rows (all of them, resumes too)."""
    failed = [r["round"] for r in rows if r.get("round-failed")]
    device_failures = sum(f.get("code") != PRIVACY_BUDGET_ERROR_CODE
                          for r in rows for f in r.get("device-failures", []))
    if not failed and not device_failures:
        status = "ok"
    elif rows and len(failed) > threshold * len(rows):
        status = "failed"
    else:
        status = "degraded"
    return RunOutcome(status, len(rows), failed, device_failures, threshold)


def write_status(run_root: Path, outcome: RunOutcome) -> None:
    atomic_write_text(run_root / STATUS_FILE, json.dumps(
        {**asdict(outcome), "line": outcome.line()}, indent=2) + "\n")


def read_status(run_root: Path) -> dict[str, Any] | None:
    """``status.json`` of a run directory, None if the run never wrote one."""
    try:
        status = json.loads((run_root / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def status_in_log(text: str) -> tuple[str, str] | None:
    """(status, details) of the last ``[fedq] run status:`` line in a run's log."""
    found = None
    for match in _STATUS_LINE.finditer(text):
        found = (match.group(1), match.group(2).strip())
    return found
