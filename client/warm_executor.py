"""A warm ClientApp executor: one fork server per device instead of a process per message.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message
(``SubprocessExecutor``): a Python start, Flower's imports, numpy, gymnasium, fedq (and
torch on the torch backend) on every round, seconds that a deployed round spent outside
training. Flower's own warm pools exist only for its Kubernetes executor.

``fedq-supernode`` (:mod:`client.supernode`) runs Flower's SuperNode with ``--isolation
process`` and, in place of ``flower-superexec``, this executor. Before the SuperNode
starts a thread, its process imports what a ClientApp needs and forks the **fork
server** (:func:`start`): a single-threaded process that never opens a connection, so
forking it is safe. The fork server forks

* the **task loop**: Flower's own ``run_superexec`` (the same AcquireTask polling, one
  task per token, auth secret, parent-death monitor on the SuperNode), whose executor
  (:class:`ForkServerExecutor`) hands each launch to the fork server over a pipe instead
  of starting a process;
* for each launch, a **task child** running Flower's own ``run_clientapp`` (heartbeat,
  FAB install, the app, reply, task output, Flower's exit codes) with that token; it
  starts with every import done, sharing the fork server's pages copy-on-write.

The fork server reaps every child and logs how it ended. A task child that dies without
replying (killed by a signal, or an exit code Flower's ``run_clientapp`` never uses after
a reply) would leave the ServerApp waiting for a message that never comes, so the fork
server forks a **reporter** that, with the same token, replies to the task's message
with an error naming what happened (code :data:`CLIENTAPP_DIED_ERROR_CODE`) and marks the
task failed. When the SuperNode goes, the fork server ends its children and itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import importlib
import json
import math
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from fedq.client import handoff
from fedq.client.clientapp_launcher import bound_message_pull
from fedq.common import hop_trace

# process names (/proc/PID/comm, what ps and the deployment benchmark show)
FORK_SERVER_NAME, TASK_LOOP_NAME, TASK_NAME = "fedq-forkserver", "fedq-taskloop", "fedq-clientapp"
REPORTER_NAME = "fedq-reporter"
CLIENTAPP_DIED_ERROR_CODE = 20  # a ClientApp process that died before it replied
CHILD_FAILED_EXIT_CODE = 70  # a forked child whose Python code raised outside Flower's exits
DIED_REASON_PREFIX = "fedq warm executor: ClientApp process"
_REAP_PERIOD_S = 0.1


@dataclass(frozen=True)
class Launch:
    """What the task loop asks the fork server to run: one token's ClientApp."""

    token: str
    task_id: int
    runtime_api_address: str
    insecure: bool
    root_certificates_path: str | None
    runtime_dependency_install: bool
    parent_pid: int | None

    def encode(self) -> bytes:
        """One line of JSON (well under PIPE_BUF, so a write is atomic)."""
        return json.dumps(asdict(self)).encode() + b"\n"


class ForkServerExecutor:
    """Flower's ``Executor`` protocol, launching through the fork server's pipe."""

    def __init__(self, request_fd: int) -> None:
        self.request_fd = request_fd

    def get_eligible_capacity(self, supported_task_types: set[Any], **_: Any
                              ) -> tuple[set[Any], set[str]]:
        """Every task type can launch at once, as with Flower's subprocess executor."""
        return supported_task_types, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        """No capacity gate."""

    def launch(self, spec: Any) -> Any:
        """Ask the fork server to run ``spec``'s token; a ClientApp task only."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedq's warm executor runs ClientApp tasks only, "
                                       f"not {spec.task_type}")
        launch = Launch(spec.token, spec.task_id, spec.runtime_api_address, spec.insecure,
                        spec.root_certificates_path, spec.runtime_dependency_install,
                        spec.parent_pid)
        hop_trace.mark("taskloop-launch")
        try:
            os.write(self.request_fd, launch.encode())
        except OSError as err:
            return LaunchResult.failed(f"fedq fork server unreachable: {err}")
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Nothing to maintain: the fork server reaps its children."""

    def close(self) -> None:
        """Close the pipe to the fork server."""
        with contextlib.suppress(OSError):
            os.close(self.request_fd)


def start(runtime_api_address: str, insecure: bool, root_certificates_path: str | None,
          superexec_auth_secret: bytes | None, runtime_dependency_install: bool,
          backend: object = None, bells: handoff.Bells | None = None) -> int:
    """Fork the fork server from this single-threaded process, which then imports what
    a ClientApp needs (:func:`preload`); returns its pid. Call it before anything starts
    a thread or a connection. The SuperNode's own imports stay shared with it. With
    ``bells`` (:mod:`client.handoff`), the task loop wakes when the SuperNode rings and
    each task child rings the SuperNode when it has pushed its reply."""
    supernode = os.getpid()
    _freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _name(FORK_SERVER_NAME)
        preload(backend)
        code = _ForkServer(supernode, bells).serve(
            lambda request_fd: _run_task_loop(
                request_fd, supernode, runtime_api_address, insecure,
                root_certificates_path, superexec_auth_secret, runtime_dependency_install,
                bells))
    finally:
        os._exit(code)


class _ForkServer:
    """The single-threaded loop that forks the task loop and the task children."""

    def __init__(self, supernode: int, bells: handoff.Bells | None = None) -> None:
        self.supernode = supernode
        self.bells = bells
        self.notes = Path(tempfile.mkdtemp(prefix="fedq-warm-"))  # see _run_task
        self.tasks: dict[int, Launch] = {}
        self.reporters: set[int] = set()
        self.stopping = False

    def serve(self, task_loop: Any) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        read_fd, write_fd = os.pipe()
        loop_pid = _fork_child(lambda: task_loop(write_fd), close=(read_fd,))
        os.close(write_fd)
        pending = b""
        while not self.stopping:
            if os.getppid() != self.supernode:
                _log(INFO, "fedq warm executor: SuperNode gone, stopping")
                break
            ready, _, _ = select.select([read_fd], [], [], _REAP_PERIOD_S)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:  # the task loop closed its end: it ended
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    launch = Launch(**json.loads(line))
                    hop_trace.mark("forkserver-fork")
                    pid = _fork_child(lambda launch=launch: _run_task(launch, self._note(),
                                                                      self.bells),
                                      close=(read_fd,))
                    self.tasks[pid] = launch
            if self._reap(loop_pid):
                break
        self._end_children(loop_pid)
        shutil.rmtree(self.notes, ignore_errors=True)
        return 0

    def _note(self, pid: int | None = None) -> Path:
        """Where task child ``pid`` (default: this process) notes the message it pulled."""
        return self.notes / f"{pid or os.getpid()}.msg"

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _reap(self, loop_pid: int) -> bool:
        """Collect ended children; True when the task loop ended."""
        loop_ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return loop_ended
            if pid == 0:
                return loop_ended
            if pid == loop_pid:
                _log(WARNING, "fedq warm executor: task loop ended (%s)", _how(status))
                loop_ended = True
            elif pid in self.reporters:
                self.reporters.discard(pid)
            elif (launch := self.tasks.pop(pid, None)) is not None:
                self._task_ended(pid, launch, status)

    def _task_ended(self, pid: int, launch: Launch, status: int) -> None:
        how = _how(status)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1):
            # run_clientapp's own exits: it replied (or its error reply) and pushed the
            # task output before exiting
            _log(DEBUG, "fedq warm executor: task %d (pid %d) %s", launch.task_id, pid, how)
            self._note(pid).unlink(missing_ok=True)
            return
        reason = f"{DIED_REASON_PREFIX} {pid} for task {launch.task_id} {how} before replying"
        _log(ERROR, reason)
        note = self._note(pid)
        self.reporters.add(_fork_child(lambda: _report_death(launch, note, reason, self.bells),
                                       close=()))

    def _end_children(self, loop_pid: int) -> None:
        for pid in (loop_pid, *self.tasks, *self.reporters):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.05)
        for pid in (loop_pid, *self.tasks, *self.reporters):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _freeze() -> None:
    """Keep the garbage collector off the objects that exist now, before a fork: a
    collection writes to every object it visits, which would copy each page a forked
    child shares with its parent (measured: ~50 MiB private per child without it)."""
    gc.collect()
    gc.freeze()


def _log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log through Flower's logger, as the processes it replaces do."""
    from flwr.supercore import log

    log(level, msg, *args, **kwargs)


def _name(name: str) -> None:
    """Name this process (its ``comm``, at most 15 characters) so a forked child is
    told apart from the SuperNode whose command line it shares."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _fork_child(body: Any, close: tuple[int, ...]) -> int:
    """Fork a child that runs ``body()`` and exits with its code (never returns to the
    fork server's loop, never runs the fork server's exit handlers)."""
    _freeze()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in close:
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        code = body() or 0
    except SystemExit as done:  # flwr_exit ends with sys.exit
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # a child must never return into the fork server's loop
        code = CHILD_FAILED_EXIT_CODE
        _log(ERROR, "fedq warm executor: child %d failed", os.getpid(), exc_info=True)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_task_loop(request_fd: int, supernode: int, runtime_api_address: str,
                   insecure: bool, root_certificates_path: str | None,
                   superexec_auth_secret: bytes | None,
                   runtime_dependency_install: bool, bells: handoff.Bells | None) -> None:
    """Flower's ``run_superexec`` with the fork server as its executor (and, with
    ``bells``, its poll's sleep ended by the SuperNode's ring)."""
    from flwr.supercore.superexec import run_superexec as module

    _name(TASK_LOOP_NAME)
    module.get_executor = lambda *_, **__: ForkServerExecutor(request_fd)  # type: ignore[attr-defined]
    if bells is not None:  # its own interval (FLWR_SUPEREXEC_TASK_POLL_INTERVAL) as before
        handoff.sleep_until_rung(module, bells.task, math.inf)
    sys.argv[0] = "flower-superexec"
    module.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                         root_certificates_path=root_certificates_path,
                         superexec_auth_secret=superexec_auth_secret,
                         parent_pid=supernode,
                         runtime_dependency_install=runtime_dependency_install)


def _run_task(launch: Launch, note: Path, bells: handoff.Bells | None = None) -> None:
    """Flower's ``run_clientapp`` for one token, as ``flwr-clientapp`` would run it;
    with ``bells``, it rings the SuperNode once its reply is pushed.

    The message it pulls is also written (without its content) to ``note``: the SuperNode
    hands a message out once, so if this process dies the reporter needs it to reply."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as runtime

    _name(TASK_NAME)
    hop_trace.mark("child-start")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: its stacks
    bound_message_pull(runtime)
    pull = runtime.pull_task_input

    def pull_and_note(client: Any) -> Any:
        message, context, run, fab = pull(client)
        hop_trace.mark("child-pulled", group=message.metadata.group_id,
                       dst=message.metadata.dst_node_id)
        proto = message_to_proto(remove_content_from_message(message))
        note.write_bytes(proto.SerializeToString())
        return message, context, run, fab

    runtime.pull_task_input = pull_and_note  # type: ignore[assignment]
    runtime.push_message = handoff.ring_after(  # type: ignore[assignment]
        runtime.push_message, bells.reply if bells else None, "child-pushed")
    sys.argv[0] = "flwr-clientapp"  # Flower's exit handling recognises its ClientApp by it
    runtime.run_clientapp(runtime_api_address=launch.runtime_api_address,
                          token=launch.token, insecure=launch.insecure,
                          certificates=validate_and_resolve_root_certificates(
                              launch.root_certificates_path, launch.insecure),
                          parent_pid=launch.parent_pid,
                          runtime_dependency_install=launch.runtime_dependency_install)


def _report_death(launch: Launch, note: Path, reason: str,
                  bells: handoff.Bells | None = None) -> None:
    """Reply to the dead task's message (from its ``note``) with an error naming what
    happened, and mark the task failed, with the task's own token."""
    from flwr.app import Error, Message
    from flwr.common.constant import SubStatus
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    _name(REPORTER_NAME)
    retry = make_simple_http_retry_invoker()
    retry.max_tries = 3
    client = RuntimeHttpClient.from_server_address(
        server_address=launch.runtime_api_address, insecure=launch.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            launch.root_certificates_path, launch.insecure),
        interceptors=[RuntimeTokenHttpInterceptor(launch.token)], retry_invoker=retry)
    try:
        if note.exists():  # it died after pulling its message: reply to that message
            proto = ProtoMessage.FromString(note.read_bytes())
            message = message_from_proto(proto)
            message.metadata.__dict__["_message_id"] = proto.metadata.message_id
            reply = Message(Error(code=CLIENTAPP_DIED_ERROR_CODE, reason=reason),
                            reply_to=message)
            push_message(client, reply, _Ids(node_id=message.metadata.dst_node_id,
                                             run_id=message.metadata.run_id))
        push_task_output(client, None, SubStatus.FAILED, reason)
        if bells is not None:  # the SuperNode sends the error reply without a poll's wait
            bells.reply.ring()
    finally:
        client.close()
        note.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Ids:
    """The two fields of a Context that ``push_message`` reads."""

    node_id: int
    run_id: int


WARM_ENV = "FEDQ_WARM_EXECUTOR"  # "0": Flower's SuperExec, one flwr-clientapp per message


def enabled(environ: Any) -> bool:
    """``FEDQ_WARM_EXECUTOR``: 1 (default) or 0; anything else is refused, naming it."""
    raw = (environ.get(WARM_ENV) or "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"{WARM_ENV}={raw!r}: must be 1 (warm executor) or 0 (Flower's "
                         "SuperExec, a process per message)")
    return raw == "1"


def process_isolation(argv: list[str]) -> list[str]:
    """``argv`` with its ``--isolation`` replaced by ``--isolation process``: the
    SuperNode then starts no SuperExec of its own."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--isolation":
            skip = True
        elif not arg.startswith("--isolation="):
            out.append(arg)
    return [*out, "--isolation", "process"]


def preload(backend: object) -> None:
    """Import what every ClientApp message needs, once: Flower's ClientApp runtime,
    numpy, gymnasium and fedq's ClientApp; torch only when the node's config names the
    torch backend (a numpy device never loads it)."""
    import gymnasium  # noqa: F401
    import numpy  # noqa: F401
    from flwr.cli import install  # noqa: F401
    from flwr.supercore.superexec import run_superexec  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    from fedq.client import client_app  # noqa: F401
    from fedq.common import numpy_learner  # noqa: F401

    if backend == "torch":
        # torch.optim imports torch._dynamo when the first optimizer is built: ~0.9 s
        # that every forked child paid again (measured), unless imported here
        import torch._dynamo  # noqa: F401

        from fedq.common import dqn  # noqa: F401


def start_for_supernode(bells: handoff.Bells | None = None) -> int:
    """Parse this ``fedq-supernode``'s (Flower SuperNode) arguments, switch it to
    process isolation, preload and fork the fork server (ringing ``bells``); returns its
    pid."""
    sys.argv[1:] = process_isolation(sys.argv[1:])
    from flwr.supercore.address import resolve_bind_address
    # the package exports a function of the module's name: import the module itself
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

    parse = getattr(cli, "_parse_supernode_lifespan_config", None)
    if parse is None:
        raise RuntimeError("flwr.supernode.cli.flower_supernode no longer has "
                           "_parse_supernode_lifespan_config; fedq's warm executor needs "
                           f"updating for this Flower (or set {WARM_ENV}=0)")
    config = parse()
    host = f"[{config.host}]" if ":" in config.host else config.host
    address = resolve_bind_address(f"{host}:{config.port}")
    return start(address, config.runtime_certificates is None,
                 config.runtime_root_certificates_path, config.superexec_auth_secret,
                 config.runtime_dependency_install, config.node_config.get("backend"), bells)
