"""The best global model by federated evaluation, kept beside the latest.

DQN policies often reach the goal and then lose it (issue 20: CartPole seeds at 500 fall
to ~100 later in the same run), so the newest checkpoint is not necessarily the model to
deploy. After every round whose federated greedy return (``eval-return-mean``) is at
least the best so far, the server writes that round's global model to
``checkpoints/best.pt`` (atomically, then its ``best.pt.sha256`` digest, as for the round
checkpoints); ties go to the later round, which has trained longer at the same return.
Every metrics row carries ``best`` = ``{"round", "eval-return-mean"}`` of the best model
up to and including that round, and ``fedq-export`` exports ``best.pt`` by default.

Order within a round: metrics row, round checkpoint, then ``best.pt``. On resume the
last kept row says which round ``best.pt`` must hold; if it holds another (a crash
between the round checkpoint and ``best.pt``, or a best round a resume repeats), it is
rebuilt from that round's checkpoint when one is kept, and otherwise set aside with a
warning and the best model starts over from the resumed rounds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedq.common.atomic import atomic_open, atomic_write_text
from fedq.server.run_directory import RunDirectory, RunDirectoryError, digest_of, digest_path

BEST_FILE = "best.pt"
SCORE_KEY = "eval-return-mean"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Best:
    """Which round's global model is the best so far, and its federated return."""

    round: int
    score: float

    def row(self) -> dict[str, Any]:
        return {"round": self.round, SCORE_KEY: self.score}


def round_score(row: dict[str, Any]) -> float | None:
    """The federated greedy return of a metrics row, or None if the round has none."""
    value = row.get("eval", {}).get(SCORE_KEY)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class BestModel:
    """Tracks and writes ``checkpoints/best.pt`` of one run directory."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self.path = run_dir.checkpoints / BEST_FILE
        self.best: Best | None = None

    def consider(self, server_round: int, score: float | None) -> bool:
        """Whether ``server_round``'s model (return ``score``) becomes the best; updates
        :attr:`best` (call :meth:`save` with the model after the round checkpoint)."""
        if score is None or (self.best is not None and score < self.best.score):
            return False
        self.best = Best(server_round, score)
        return True

    def row(self) -> dict[str, Any] | None:
        """The metrics row's ``best`` field."""
        return self.best.row() if self.best else None

    def save(self, state_dict: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Write the current best round's model, then its digest."""
        assert self.best is not None, "consider() a round before saving it"
        with atomic_open(self.path) as fh:
            torch.save({"round": self.best.round, SCORE_KEY: self.best.score,
                        "state_dict": state_dict, **extra}, fh)
        atomic_write_text(digest_path(self.path), digest_of(self.path))

    def stored_round(self) -> int | None:
        """The round ``best.pt`` holds if it is complete (digest matches), else None."""
        digest = digest_path(self.path)
        if not (self.path.is_file() and digest.is_file()):
            return None
        if digest_of(self.path) != digest.read_text()[:200].strip():
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception:  # torch raises many types for foreign files; the digest matched
            return None
        stored = payload.get("round") if isinstance(payload, dict) else None
        return stored if isinstance(stored, int) else None

    def resume(self, kept_rows: list[dict[str, Any]]) -> None:
        """Take up the best model of the rounds a resumed run keeps (see module doc)."""
        recorded = kept_rows[-1].get("best") if kept_rows else None
        if not recorded:
            self._set_aside_stale(None)
            return
        expected = Best(int(recorded["round"]), float(recorded[SCORE_KEY]))
        if self.stored_round() == expected.round:
            self.best = expected
            return
        try:
            checkpoint = self.run_dir.load_checkpoint(expected.round) \
                if self.run_dir.is_complete(expected.round) else None
        except RunDirectoryError:
            checkpoint = None
        if checkpoint is None:
            self._set_aside_stale(expected)
            return
        self.best = expected
        extra = {k: v for k, v in checkpoint.items() if k not in ("round", "state_dict")}
        self.save(checkpoint["state_dict"], extra)
        logger.warning("[fedq] %s: rebuilt %s from round-%04d.pt (the best round on "
                       "record)", self.run_dir.root, BEST_FILE, expected.round)

    def _set_aside_stale(self, expected: Best | None) -> None:
        if expected is not None:
            logger.warning("[fedq] %s: the best model on record (round %d, return %g) is "
                           "neither in %s nor in a kept round checkpoint; the best model "
                           "starts over from the resumed rounds", self.run_dir.root,
                           expected.round, expected.score, BEST_FILE)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for item in (self.path, digest_path(self.path)):
            if item.exists():
                item.rename(item.with_name(f"{item.name}.superseded-{stamp}"))
