"""A run's outputs on disk: resolved config, per-round metrics, checkpoints, plot.

Layout of ``<run-dir>``::

    config.json            the resolved config of the run
    metrics.jsonl          one JSON object per completed round
    clients.jsonl          one JSON object per device reply (round, phase, its metrics)
    privacy.jsonl          DP devices' epsilon and accountant segments per round, and budget
                           declines (server/privacy_log.py)
    tensorboard/           TensorBoard event files: global and per-client scalars
    checkpoints/round-NNNN.pt   global Q-network after round NNNN (last few kept)
    checkpoints/LATEST     name of the newest complete checkpoint
    learning_curve.png     written when the run ends
    client_curves.png      per-device learning curves, written when the run ends
    devices/<name>/        simulated devices' state (replay buffer, learner, counters)

A round is logged to ``metrics.jsonl`` first and checkpointed second. On resume, rows
past the newest checkpoint (a round whose checkpoint never landed) are dropped, so the
resumed run repeats exactly that round and the file has no gaps or duplicates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_open, atomic_write_text
from common.config import RESUME_CHANGEABLE_KEYS, FedqConfig

_KEEP_CHECKPOINTS = 3


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (e.g. resume with another config)."""


class RunDirectory:
    """Reads and writes one run's outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "config.json"
        self.metrics_path = root / "metrics.jsonl"
        self.clients_path = root / "clients.jsonl"
        self.tensorboard_dir = root / "tensorboard"
        self.client_plot_path = root / "client_curves.png"
        self.checkpoints = root / "checkpoints"
        self.plot_path = root / "learning_curve.png"

    def start(self, config: FedqConfig) -> int:
        """Prepare for a run; returns the last completed round (0 for a fresh run).

        A fresh run refuses a directory that already holds metrics, so results are never
        overwritten by accident; ``resume = true`` continues it instead.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        last_round = self.latest_round()
        if not config.resume:
            if self.metrics_path.exists() or last_round:
                raise RunDirectoryError(
                    f"run-dir '{self.root}' already holds a run; set resume=true to continue "
                    "it or choose another run-dir")
        elif self.config_path.exists():
            _check_resumable(json.loads(self.config_path.read_text()), config)
        atomic_write_text(self.config_path, json.dumps(config.to_mapping(), indent=2) + "\n")
        self._truncate_metrics(last_round)
        return last_round

    # --- metrics ----------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        _append_rows(self.metrics_path, [row])

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_rows(self.metrics_path)

    def append_client_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Per-device rows of a round; written before the round's ``metrics.jsonl`` row,
        so resume truncation (by round) keeps the two files consistent."""
        _append_rows(self.clients_path, rows)

    def read_client_metrics(self) -> list[dict[str, Any]]:
        return _read_rows(self.clients_path)

    def _truncate_metrics(self, last_round: int) -> None:
        for path in (self.metrics_path, self.clients_path):
            rows = [r for r in _read_rows(path) if r["round"] <= last_round]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    # --- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, state_dict: dict[str, torch.Tensor],
                        extra: dict[str, Any]) -> Path:
        path = self.checkpoints / f"round-{server_round:04d}.pt"
        with atomic_open(path) as fh:
            torch.save({"round": server_round, "state_dict": state_dict, **extra}, fh)
        atomic_write_text(self.checkpoints / "LATEST", path.name)
        for old in sorted(self.checkpoints.glob("round-*.pt"))[:-_KEEP_CHECKPOINTS]:
            old.unlink()
        return path

    def latest_round(self) -> int:
        pointer = self.checkpoints / "LATEST"
        if not pointer.exists():
            return 0
        return int(pointer.read_text().strip()[len("round-"):-len(".pt")])

    def load_checkpoint(self, server_round: int | None = None) -> dict[str, Any]:
        server_round = self.latest_round() if server_round is None else server_round
        return torch.load(self.checkpoints / f"round-{server_round:04d}.pt", weights_only=True)


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(row) + "\n" for row in rows))
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            break
    return rows


def _check_resumable(saved: dict[str, Any], config: FedqConfig) -> None:
    """Resuming continues the same experiment: only the keys in
    :data:`RESUME_CHANGEABLE_KEYS` (e.g. the number of rounds) may differ from the saved
    config; every other difference is refused, naming the fields."""
    changed = config_changes(saved, config.to_mapping())
    if changed:
        raise RunDirectoryError("cannot resume: " + "; ".join(
            f"config field '{key}' {change}" for key, change in changed.items()) + " (only "
                                + ", ".join(sorted(RESUME_CHANGEABLE_KEYS))
                                + " may change on resume)")


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, str]:
    """{key: "was A, now B"} for every key that differs and a resume may not change."""
    return {key: f"was {saved[key]!r}, now {value!r}" for key, value in now.items()
            if key not in RESUME_CHANGEABLE_KEYS and key in saved and saved[key] != value}
