"""A device's saved state: numbered generation folders, a manifest each, a pointer file.

Layout of a device state directory::

    gen-000041/            one complete save: learner.pt, replay_buffer.npz, counters.json,
      ...                  privacy.json (with DP), update_residual.npz (with compression)
      MANIFEST.json        written last: every file's size and sha256
    gen-000042/            the newest save
    CURRENT                "gen-000042": the generation the last save committed

A save writes a new folder (numbered past every folder there), fsyncs its files, writes
its manifest, then replaces ``CURRENT``; only after that does it delete older folders,
keeping the newest complete one before it as a spare. "Complete" means: the manifest
parses and every file it lists has its size and digest. Loading verifies the generation
``CURRENT`` names and, if the pointer is missing, not a generation name (a crafted
``../x`` is never followed), or names a folder that fails the check, scans the folders
newest first for a complete one, logging which it skipped and why.

A folder with a manifest that does not verify was a finished save damaged afterwards;
falling back past it would lose what it recorded. With ``keep_history`` (a device with a
privacy ledger: falling back would forget spent epsilon) that refuses with
:class:`DeviceStateError` instead. A directory with generation folders but none complete
also refuses: starting afresh there would delete the old state on the next save.

torch-free: :mod:`client.experience_log` uses it on devices without torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedq.common.atomic import PRIVATE, atomic_write_text

DEVICE_STATE_ERROR_CODE = 1003
"""Error code of a train reply from a device whose state cannot be loaded or saved."""
POINTER_FILE = "CURRENT"
LOCK_FILE = ".lock"
MANIFEST_FILE = "MANIFEST.json"
_GENERATION = re.compile(r"gen-(\d{6,9})")
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_POINTER_BYTES = 64
_CHUNK = 1 << 20

logger = logging.getLogger(__name__)


class DeviceStateError(RuntimeError):
    """A device state directory cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Generation:
    """One generation folder and what checking it found."""

    number: int
    path: Path
    problem: str | None  # None: complete
    has_manifest: bool

    @property
    def damaged(self) -> bool:
        """A finished save (it has a manifest) that no longer verifies."""
        return self.problem is not None and self.has_manifest


def generation_name(number: int) -> str:
    return f"gen-{number:06d}"


def generations(state_dir: Path) -> list[Generation]:
    """Every generation folder of ``state_dir``, newest first, each checked."""
    found = []
    if state_dir.is_dir():
        for entry in state_dir.iterdir():
            match = _GENERATION.fullmatch(entry.name)
            if match is None or entry.is_symlink() or not entry.is_dir():
                continue
            problem = verify(entry)
            found.append(Generation(int(match.group(1)), entry, problem,
                                    (entry / MANIFEST_FILE).exists()))
    return sorted(found, key=lambda g: g.number, reverse=True)


def verify(generation: Path) -> str | None:
    """Why ``generation`` is not a complete save, or None if it is."""
    manifest_path = generation / MANIFEST_FILE
    if not manifest_path.exists():
        return f"no {MANIFEST_FILE} (a save that did not finish)"
    try:
        files = _read_manifest(manifest_path)
    except (OSError, ValueError, RecursionError) as err:
        return f"{MANIFEST_FILE} unreadable: {str(err)[:200]}"
    for name, (size, digest) in files.items():
        path = generation / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def read_pointer(state_dir: Path) -> tuple[str | None, str | None]:
    """(generation name ``CURRENT`` holds, problem with it): a missing pointer, garbage or
    a path (anything but a bare generation name) is a problem, never a path to follow."""
    pointer = state_dir / POINTER_FILE
    if not pointer.exists():
        return None, f"{POINTER_FILE} is missing"
    try:
        with open(pointer, "rb") as fh:
            raw = fh.read(_MAX_POINTER_BYTES + 1)
    except OSError as err:
        return None, f"{POINTER_FILE} unreadable: {err.strerror or err}"
    text = raw.decode("utf-8", errors="replace").strip()
    if len(raw) > _MAX_POINTER_BYTES or _GENERATION.fullmatch(text) is None:
        return None, f"{POINTER_FILE} holds {text[:40]!r}, not a generation name"
    return text, None


def resolve(state_dir: Path, *, keep_history: bool, legacy_files: tuple[str, ...] = ()
            ) -> Path | None:
    """The generation to load: the one ``CURRENT`` names if complete, else the newest
    complete one (logging what was skipped), None for a directory never saved to.

    ``legacy_files``: a generation without a manifest (written before manifests existed)
    is accepted when ``CURRENT`` names it and it holds these files.
    Raises :class:`DeviceStateError` where loading would lose saved state: no complete
    generation among existing ones, or, with ``keep_history``, a damaged generation newer
    than the one found.
    """
    name, pointer_problem = read_pointer(state_dir)
    found = generations(state_dir)
    if name is not None and not any(g.path.name == name for g in found):
        pointer_problem = f"{POINTER_FILE} names {name}, which does not exist"
    if not found:
        if (state_dir / POINTER_FILE).exists():
            raise DeviceStateError(f"device state '{state_dir}': {pointer_problem or 'empty'}"
                                   " and no generation folder to recover from; refusing to "
                                   "start afresh over it (move the directory away to do so)")
        return None
    skipped: list[Generation] = []
    for gen in found:
        if gen.problem is None:
            break
        if name == gen.path.name and not gen.has_manifest and _holds(gen.path, legacy_files):
            gen = Generation(gen.number, gen.path, None, False)  # a pre-manifest save
            break
        skipped.append(gen)
    else:
        raise DeviceStateError(
            f"device state '{state_dir}': "
            + (f"{pointer_problem}, and " if pointer_problem else "")
            + "no complete generation ("
            + "; ".join(f"{g.path.name}: {g.problem}" for g in skipped)
            + "); refusing to start afresh over it (move the directory away to do so)")
    damaged = [g for g in skipped if g.damaged or g.path.name == name]
    if keep_history and damaged:
        raise DeviceStateError(
            f"device state '{state_dir}': {damaged[0].path.name} is damaged "
            f"({damaged[0].problem}); falling back to {gen.path.name} would forget the "
            "privacy budget spent since, so this device refuses to train. Restore the "
            "folder from a backup, or move it away to accept that loss explicitly")
    if pointer_problem is not None or name != gen.path.name or skipped:
        why = ([pointer_problem] if pointer_problem is not None
               else [f"{POINTER_FILE} names {name}"] if name != gen.path.name else [])
        why += [f"skipped {g.path.name} ({g.problem})" for g in skipped]
        logger.warning("device state '%s': loading %s; %s", state_dir, gen.path.name,
                       "; ".join(why))
    return gen.path


@contextmanager
def state_lock(state_dir: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the device state's lock (``<state-dir>/.lock``, fcntl) while loading,
    changing and saving the state: one writer at a time.

    Every writer takes it: the ClientApp's training round, and ``fedq-policy run
    --record-to``. Unserialised, two writers start from the same generation and the later
    save drops the other's transitions, counters and privacy accounting (e.g. two runs'
    ClientApps on one SuperNode, or a recorder during a round). ``timeout`` (seconds;
    None waits for ever) ends the wait with a :class:`DeviceStateError` naming the
    directory and the holder's pid. The lock goes with the process that holds it, so a
    killed writer never leaves it held.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_FILE
    with open(path, "a+") as handle:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:  # type: ignore[operator]
                    handle.seek(0)
                    holder = handle.read(32).strip() or "unknown"
                    raise DeviceStateError(
                        f"device state dir '{state_dir}' is locked by another writer (pid "
                        f"{holder} holds {path}: a training round or a recorder) after "
                        f"waiting {timeout:g}s; try again when it is done") from None
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def new_generation(state_dir: Path, keep_spare: bool = True) -> Iterator[Path]:
    """A fresh generation folder to write into; on a clean exit its manifest is written,
    ``CURRENT`` names it, and older generations go (all but one complete spare)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = generations(state_dir)
    target = state_dir / generation_name((found[0].number + 1) if found else 1)
    target.mkdir(mode=0o700)
    yield target
    write_manifest(target)
    _fsync_dir(target)
    atomic_write_text(state_dir / POINTER_FILE, target.name, permissions=PRIVATE)
    _fsync_dir(state_dir)
    spare_kept = not keep_spare
    for gen in found:  # all older than target
        if gen.problem is None and not spare_kept:
            spare_kept = True
            continue
        if gen.damaged:
            continue  # evidence of damage is the operator's to remove, not ours
        shutil.rmtree(gen.path)


def write_manifest(generation: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(generation.iterdir())
             if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp")}
    atomic_write_text(generation / MANIFEST_FILE,
                      json.dumps({"format": "fedq-generation", "version": 1, "files": files}),
                      permissions=PRIVATE)


def _read_manifest(path: Path) -> dict[str, tuple[int, str]]:
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_MANIFEST_BYTES + 1)
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {_MAX_MANIFEST_BYTES} bytes")
    manifest = json.loads(raw)  # RecursionError on absurd nesting: the caller's problem
    if not isinstance(manifest, dict) or manifest.get("format") != "fedq-generation":
        raise ValueError("not a fedq generation manifest")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("no 'files' table")
    out = {}
    for name, entry in files.items():
        if not isinstance(entry, dict) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad entry {name!r}")
        size, digest = entry.get("bytes"), entry.get("sha256")
        if not isinstance(size, int) or not isinstance(digest, str):
            raise ValueError(f"bad entry {name!r}")
        out[name] = (size, digest)
    return out


def _holds(generation: Path, names: tuple[str, ...]) -> bool:
    return bool(names) and all((generation / n).is_file() for n in names)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
