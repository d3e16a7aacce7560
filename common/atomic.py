"""Crash-safe file writes: write a temp file, fsync it, then rename it over the target.

``os.replace`` is atomic on POSIX, so readers (and a process restarting after a crash)
see either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

PRIVATE = 0o600
"""Permissions of a device's state files: its replay buffer holds raw experience."""


@contextmanager
def atomic_open(path: Path, mode: str = "wb", permissions: int | None = None
                ) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path``.

    ``permissions`` (e.g. :data:`PRIVATE`) are set on the temp file before anything is
    written to it, so the data is never readable by others, not even for a moment;
    None keeps the umask's default.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as fh:
        if permissions is not None:
            os.fchmod(fh.fileno(), permissions)
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, permissions: int | None = None) -> None:
    with atomic_open(path, "w", permissions) as fh:
        fh.write(text)
