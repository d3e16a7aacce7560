"""Start Flower's ``flwr-clientapp`` without importing what only the SuperNode needs.

A SuperNode's SuperExec starts a ``flwr-clientapp`` process for every message it receives
(``TASK_TYPE_TO_COMMAND``, found on ``PATH``). Flower 1.42's console script imports it
from ``flwr.supernode.cli``, whose ``__init__`` also imports the SuperNode's own CLI: its
SQL object store (SQLAlchemy, Alembic) and HTTP server (FastAPI), ~1 s of imports on a
free core, seconds on a loaded one, paid per message and unused by the ClientApp.

:func:`main` runs the same ``flwr_clientapp()`` function with the same arguments, after
registering ``flwr.supernode.cli`` as a bare package (its real directory, its
``__init__`` not executed), so only the ClientApp's own imports load. ``fedq-supernode``
(:mod:`client.supernode`) writes a ``flwr-clientapp`` script that calls it into a
directory it puts first on its children's ``PATH``.
"""

from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

COMMAND = "flwr-clientapp"  # the name Flower's SuperExec starts per message
CLI_PACKAGE = "flwr.supernode.cli"


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with this process's arguments."""
    import flwr.supernode

    cli = types.ModuleType(CLI_PACKAGE)
    cli.__path__ = [str(Path(flwr.supernode.__file__).parent / "cli")]
    sys.modules.setdefault(CLI_PACKAGE, cli)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    from fedq.common import prompt_pulls

    prompt_pulls.apply(runtime)

    sys.argv[0] = COMMAND  # Flower's exit handling recognises its ClientApp by this name
    flwr_clientapp()


def write_launcher(directory: Path) -> Path:
    """Write the ``flwr-clientapp`` script that runs :func:`main` with this interpreter
    into ``directory`` (atomically, so a running SuperExec never sees half of it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / COMMAND
    text = (f"#!{sys.executable}\n"
            "from fedq.client.clientapp_launcher import main\n\n"
            "main()\n")
    if not path.exists() or path.read_text() != text:
        partial = directory / f".{COMMAND}.{os.getpid()}"
        partial.write_text(text)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(path)
    return path
