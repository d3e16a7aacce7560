"""A run's outputs on disk: resolved config, per-round metrics, checkpoints, plot.

Layout of ``<run-dir>``::

    config.json            the resolved config of the run
    metrics.jsonl          one JSON object per completed round
    clients.jsonl          one JSON object per device reply (round, phase, its metrics)
    privacy.jsonl          DP devices' epsilon and accountant segments per round, and budget
                           declines (server/privacy_log.py)
    tensorboard/           TensorBoard event files: global and per-client scalars
    checkpoints/round-NNNN.pt   global Q-network after round NNNN (last few kept)
    checkpoints/round-NNNN.pt.sha256   its size and digest, written after it: "complete"
    checkpoints/LATEST     name of the newest complete checkpoint
    checkpoints/best.pt    global Q-network of the round with the best federated return so
                           far, and its best.pt.sha256 (server/best_model.py)
    metrics.superseded.jsonl, clients.superseded.jsonl   rows a resume took out of the
                           two logs (rounds it repeats), kept rather than deleted
    .lock                  held (fcntl) by the ServerApp writing the run: one at a time
    learning_curve.png     written when the run ends
    client_curves.png      per-device learning curves, written when the run ends
    devices/<name>/        simulated devices' state (replay buffer, learner, counters)

A round is logged to ``metrics.jsonl`` first and checkpointed second. On resume, rows
past the newest complete checkpoint (a round whose checkpoint never landed) move to the
``*.superseded.jsonl`` files, so the resumed run repeats exactly that round and the log
has no gaps or duplicates. Which checkpoint: the newest complete one no later than the
log's last round, whatever ``LATEST`` says (a missing, foreign or damaged pointer or
checkpoint is skipped with a warning naming it; a damaged checkpoint is renamed aside,
never deleted). docs/durability.md has the rules.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fedq.common.atomic import atomic_open, atomic_write_text
from fedq.common.config import RESUME_CHANGEABLE_KEYS, FedqConfig

if TYPE_CHECKING:
    import torch

_KEEP_CHECKPOINTS = 3
_CHECKPOINT = re.compile(r"round-(\d{4,9})\.pt")
_DIGEST_SUFFIX = ".sha256"
_MAX_POINTER_BYTES = 64
LOCK_FILE = ".lock"

logger = logging.getLogger(__name__)


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
        self._lock_file: IO[str] | None = None

    def start(self, config: FedqConfig) -> int:
        """Prepare for a run; returns the last completed round (0 for a fresh run).

        Takes the run directory's lock first (:meth:`lock`), held until :meth:`close`.
        A fresh run refuses a directory that already holds metrics, so results are never
        overwritten by accident; ``resume = true`` continues it instead. Every check comes
        before any change: a refused start leaves the directory as it was (only the
        ``.lock`` file may be new).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        if not config.resume:
            if self.metrics_path.exists() or self._checkpoint_files():
                raise RunDirectoryError(
                    f"run-dir '{self.root}' already holds a run; set resume=true to continue "
                    "it or choose another run-dir")
            last_round = 0
        else:
            if self.config_path.exists():
                _check_resumable(_read_config(self.config_path), config)
            last_round = self._resume_round()
        self.checkpoints.mkdir(exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config.to_mapping(), indent=2) + "\n")
        self._truncate_metrics(last_round)
        return last_round

    def lock(self) -> None:
        """Hold ``<run-dir>/.lock`` (an fcntl lock, released when this process ends or at
        :meth:`close`), so two ServerApps never write one run directory: the second gets
        a :class:`RunDirectoryError` naming the directory and the holder's pid."""
        if self._lock_file is not None:
            return
        handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(32).strip() or "unknown"
            handle.close()
            raise RunDirectoryError(
                f"run-dir '{self.root}' is in use by another ServerApp (pid {holder} holds "
                f"{self.root / LOCK_FILE}); two runs must not write one run-dir: wait for "
                "it to end or stop it, or choose another run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def close(self) -> None:
        """Release the run directory's lock (a no-op if not held)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _resume_round(self) -> int:
        """The round to resume after: the newest complete checkpoint at or before the
        log's last round. Damaged checkpoints past it are renamed aside, but only once
        the resume is certain (a refusal changes nothing)."""
        rows, torn = _read_rows(self.metrics_path)
        logged = [r["round"] for r in rows]
        last_logged = logged[-1] if logged else 0
        checkpoints = self._checkpoint_files()
        if not logged and checkpoints:
            state = ("is missing" if not self.metrics_path.exists() else
                     "holds no readable row" + (f" ({len(torn)} unreadable line(s))"
                                                if torn else ""))
            raise RunDirectoryError(
                f"cannot resume '{self.root}': {self.metrics_path.name} {state} but "
                f"{self.checkpoints} holds {checkpoints[0][1].name}: the log of the run's "
                "rounds is lost, and restarting at round 0 would overwrite the run; restore "
                f"{self.metrics_path.name} (rows may be in metrics.superseded.jsonl) or "
                "start a new run-dir")
        chosen, skipped = 0, []
        for server_round, path in checkpoints:
            problem = self._checkpoint_problem(path, server_round)
            if problem is None and server_round <= last_logged:
                chosen = server_round
                break
            skipped.append((path, problem or f"after the last round in {self.metrics_path.name}"
                            f" ({last_logged})"))
        if logged and not chosen:
            raise RunDirectoryError(
                f"cannot resume '{self.root}': {self.metrics_path.name} records rounds up to "
                f"{last_logged} but {self.checkpoints} holds no complete checkpoint of them; "
                "resuming would repeat and overwrite them (start a new run-dir, or restore "
                "a checkpoint)")
        for path, what in ((self.clients_path, "per-device rows"),
                           (self.config_path, "the saved config, so the run's config cannot "
                            "be checked against it")):
            if logged and not path.exists():
                logger.warning("[fedq] %s: %s is missing (%s); resuming without it",
                               self.root, path.name, what)
        if skipped or self._pointer_problem(chosen):
            logger.warning("[fedq] %s: resuming after round %d; %s", self.root, chosen,
                           "; ".join([self._pointer_problem(chosen) or "LATEST agrees"]
                                     + [f"skipped {p.name} ({why})" for p, why in skipped]))
        for path, _ in skipped:
            _set_aside(path)
        if chosen and not digest_path(self._checkpoint_path(chosen)).exists():
            logger.warning("[fedq] %s: resuming from round-%04d.pt, which has no digest "
                           "file (written before digests, or the digest was lost); it loads "
                           "as round %d, so it is used", self.root, chosen, chosen)
        return chosen

    # --- metrics ----------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        _append_rows(self.metrics_path, [row])

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_rows(self.metrics_path)[0]

    def append_client_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Per-device rows of a round; written before the round's ``metrics.jsonl`` row,
        so resume truncation (by round) keeps the two files consistent."""
        _append_rows(self.clients_path, rows)

    def read_client_metrics(self) -> list[dict[str, Any]]:
        return _read_rows(self.clients_path)[0]

    def _truncate_metrics(self, last_round: int) -> None:
        """Move rows past ``last_round`` (and a line torn by a crash) out of the logs
        into ``*.superseded.jsonl``: the resumed run writes those rounds again."""
        for path in (self.metrics_path, self.clients_path):
            rows, torn = _read_rows(path)
            kept = [r for r in rows if r["round"] <= last_round]
            if len(kept) == len(rows) and not torn:
                continue
            moved = [json.dumps({**r, "superseded-at": time.time()}) + "\n"
                     for r in rows if r["round"] > last_round]
            moved += [json.dumps({"torn-line": line, "superseded-at": time.time()}) + "\n"
                      for line in torn]
            superseded = path.with_name(path.stem + ".superseded.jsonl")
            with open(superseded, "a") as fh:
                fh.write("".join(moved))
                fh.flush()
                os.fsync(fh.fileno())
            logger.warning("[fedq] %s: %d row(s) past round %d moved to %s", path,
                           len(moved), last_round, superseded.name)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # --- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, state_dict: dict[str, torch.Tensor],
                        extra: dict[str, Any]) -> Path:
        """Write the checkpoint, then its digest, then ``LATEST``; then drop complete
        checkpoints of earlier rounds beyond the newest few (never this one, never a
        damaged one, never a later round)."""
        import torch  # here, not at the top: see _torch_load

        path = self._checkpoint_path(server_round)
        with atomic_open(path) as fh:
            torch.save({"round": server_round, "state_dict": state_dict, **extra}, fh)
        atomic_write_text(digest_path(path), digest_of(path))
        atomic_write_text(self.checkpoints / "LATEST", path.name)
        earlier = [(r, p) for r, p in self._checkpoint_files() if r < server_round
                   and self._checkpoint_problem(p, r) is None]
        for _, old in earlier[_KEEP_CHECKPOINTS - 1:]:
            old.unlink()
            digest_path(old).unlink(missing_ok=True)
        return path

    def latest_round(self) -> int:
        """The newest complete checkpoint's round (0: none)."""
        for server_round, path in self._checkpoint_files():
            if self._checkpoint_problem(path, server_round) is None:
                return server_round
        return 0

    def is_complete(self, server_round: int) -> bool:
        """Whether ``round-NNNN.pt`` of ``server_round`` is on disk and complete."""
        path = self._checkpoint_path(server_round)
        return path.is_file() and self._checkpoint_problem(path, server_round) is None

    def load_checkpoint(self, server_round: int | None = None) -> dict[str, Any]:
        server_round = self.latest_round() if server_round is None else server_round
        path = self._checkpoint_path(server_round)
        try:
            return _torch_load(path)
        except Exception as err:  # torch raises many types for torn or foreign files
            raise RunDirectoryError(f"checkpoint '{path}' cannot be loaded: "
                                    f"{type(err).__name__}: {str(err)[:300]}") from None

    def _checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.pt"

    def _checkpoint_files(self) -> list[tuple[int, Path]]:
        """(round, path) of every ``round-NNNN.pt`` (no links), newest round first."""
        found = []
        if self.checkpoints.is_dir():
            for path in self.checkpoints.iterdir():
                match = _CHECKPOINT.fullmatch(path.name)
                if match and path.is_file() and not path.is_symlink():
                    found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def _checkpoint_problem(self, path: Path, server_round: int) -> str | None:
        """Why ``path`` is not a complete checkpoint of ``server_round``, or None.

        Complete: its digest file matches. A checkpoint without one (written before
        digests existed) must load and say it is of ``server_round``."""
        digest = digest_path(path)
        if digest.exists():
            try:
                expected = digest.read_text()[:200].strip()
            except (OSError, UnicodeDecodeError) as err:
                return f"{digest.name} unreadable: {err}"
            return None if digest_of(path) == expected else "does not match its digest"
        try:
            payload = _torch_load(path)
        except Exception as err:  # torch raises many types for torn or foreign files
            return f"cannot be loaded: {type(err).__name__}"
        if not isinstance(payload, dict) or payload.get("round") != server_round:
            return f"is not a checkpoint of round {server_round}"
        return None

    def _pointer_problem(self, chosen: int) -> str | None:
        pointer = self.checkpoints / "LATEST"
        if not pointer.exists():
            return "checkpoints/LATEST is missing" if chosen else None
        with open(pointer, "rb") as fh:
            text = fh.read(_MAX_POINTER_BYTES).decode("utf-8", errors="replace").strip()
        if _CHECKPOINT.fullmatch(text) is None:
            return f"checkpoints/LATEST holds {text[:40]!r}, not a checkpoint name"
        if text != f"round-{chosen:04d}.pt":
            return f"checkpoints/LATEST names {text}"
        return None


def _torch_load(path: Path) -> Any:
    """``torch.load`` of a checkpoint, importing torch only when one is read or written:
    ``fedq-simulate``'s driver process uses this module for the run directory's files and
    never touches a checkpoint's tensors, and importing torch cost it ~3 s of start-up."""
    import torch

    return torch.load(path, weights_only=True)


def digest_path(path: Path) -> Path:
    """Where a checkpoint's "size sha256" digest file lives (written after it)."""
    return path.with_name(path.name + _DIGEST_SUFFIX)


def digest_of(path: Path) -> str:
    """``"<size> <sha256 hex>"`` of a file, the content of its digest file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"{path.stat().st_size} {digest.hexdigest()}"


def _set_aside(path: Path) -> None:
    """Rename a damaged checkpoint (and its digest) out of the scan, keeping it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for item in (path, digest_path(path)):
        if item.exists():
            item.rename(item.with_name(f"{item.name}.damaged-{stamp}"))


def _append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(row) + "\n" for row in rows))
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``.jsonl`` log, and the lines after a torn one (a crash mid-write)."""
    if not path.exists():
        return [], []
    rows: list[dict[str, Any]] = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            return rows, lines[i:]
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            return rows, lines[i:]
        rows.append(row)
    return rows, []


def _read_config(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise RunDirectoryError(f"cannot resume: '{path}' is unreadable: {err}") from None
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"cannot resume: '{path}' is not a JSON object")
    return saved


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
