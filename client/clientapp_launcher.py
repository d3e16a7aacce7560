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

Every ClientApp process of a ``fedq-supernode`` (this launcher's, or the warm executor's
forked child) bounds the pull of its message at ``FEDQ_MESSAGE_PULL_LIMIT_S`` (default
300 s; :func:`bound_message_pull`) rather than Flower's ``PULL_MAX_TIME`` of 2 hours. When
a run stops while a SuperNode is receiving one of its messages, Flower 1.42
(``start_client_internal``) has already created the message's task and stored the
message without its objects; it logs "Run ID ... is not in RUNNING status. Ignoring
message" and leaves both behind. The ClientApp launched for that task then waits for
objects that never come, retrying up to 500 times, backing off to 10 s: about 80 minutes
in which no fedq code runs yet (the round watch starts with the handler), so nothing
could end it. The fault drill found such processes (docs/durability.md). Bounded, the
pull gives up, Flower marks the task failed, and the process ends.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.client import env_settings

COMMAND = "flwr-clientapp"  # the name Flower's SuperExec starts per message
CLI_PACKAGE = "flwr.supernode.cli"
MESSAGE_PULL_ENV = "FEDQ_MESSAGE_PULL_LIMIT_S"
# a round's weights cross a LAN in well under a second, a slow radio link in a minute
DEFAULT_MESSAGE_PULL_S = 300.0
MESSAGE_PULL_RANGE_S = (5.0, 7200.0)  # up to Flower's own PULL_MAX_TIME


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with this process's arguments."""
    import flwr.supernode

    cli = types.ModuleType(CLI_PACKAGE)
    cli.__path__ = [str(Path(flwr.supernode.__file__).parent / "cli")]
    sys.modules.setdefault(CLI_PACKAGE, cli)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    bound_message_pull(runtime)
    sys.argv[0] = COMMAND  # Flower's exit handling recognises its ClientApp by this name
    flwr_clientapp()


def message_pull_limit(environ: Mapping[str, str]) -> float:
    """``FEDQ_MESSAGE_PULL_LIMIT_S`` (default 300, in [5, 7200]); refuses other values,
    naming the variable."""
    return env_settings.seconds(environ, MESSAGE_PULL_ENV, DEFAULT_MESSAGE_PULL_S,
                                *MESSAGE_PULL_RANGE_S)


def bound_message_pull(runtime: types.ModuleType, environ: Mapping[str, str] = os.environ
                       ) -> None:
    """In a ClientApp process (``runtime``: Flower's ``run_clientapp`` module): prompt
    object pulls (:mod:`common.prompt_pulls`) that give up after
    :func:`message_pull_limit` seconds, and a log line naming why when the message's pull
    does (module docstring); idempotent."""
    from fedq.common import prompt_pulls

    if getattr(runtime.pull_task_input, "fedq_bounded", False):
        return
    limit = message_pull_limit(environ)
    prompt_pulls.apply(runtime)
    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree, max_time=limit)
    pull_task_input = runtime.pull_task_input

    @functools.wraps(pull_task_input)
    def bounded(client: Any) -> Any:
        from flwr.supercore import log
        from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

        try:
            return pull_task_input(client)
        except ObjectPullError:
            log(logging.ERROR, "[fedq] ClientApp pid %d: its message's objects did not "
                "arrive within %g s (%s), so it gives the task up; a run stopped while "
                "the SuperNode was receiving the message leaves such a task behind",
                os.getpid(), limit, MESSAGE_PULL_ENV)
            raise

    bounded.fedq_bounded = True  # type: ignore[attr-defined]
    runtime.pull_task_input = bounded


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
