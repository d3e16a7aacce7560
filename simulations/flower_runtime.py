"""Drive real Flower 1.42 processes on 127.0.0.1 from Python, isolated and leak-free.

Our simulation runner, tests and benchmarks run fedq the way users do, through
``flower-superlink``, ``flower-supernode`` and ``flwr run``, rather than through deprecated
in-process shortcuts. Three things make that unsafe by default, and this module owns them:

* **Shared state.** ``flwr`` keeps its connections, installed FABs and caches in ``~/.flwr``,
  and the SuperLink that ``flwr run`` starts for its "local" connection binds the fixed
  port 39091 and outlives the command, so two runs at once collide. Here every SuperLink
  and SuperNode gets free ports and a private ``FLWR_HOME`` under the caller's work
  directory, and each simulation gets a private Ray temp dir.
* **Stray processes.** A SuperLink spawns ``flower-superexec`` in a *new session*, which
  spawns ``flwr-simulation`` / ``flwr-serverapp``, which start a Ray cluster; a SuperNode
  spawns its own SuperExec and ``flwr-clientapp``. Killing the process we started leaves
  those behind for seconds or for good. Every process we start carries a tag in its
  environment, and teardown signals everything that has the tag, descends from one of our
  processes, or shares a session with one, then escalates to SIGKILL. A small watchdog
  process per SuperLink does the same sweep if our Python process dies without tearing
  down (SIGKILL, ``os._exit``), e.g. when a test runner kills a hung test.
* **Silent failure.** ``flwr run --stream`` exits 0 even when the ServerApp raises; the
  outcome is only visible as the run status (``finished:failed``) in ``flwr ls``.
  :func:`submit_run` queries it and reports it in :class:`RunResult`.

In Flower 1.42 the Control, Fleet and Runtime APIs of a SuperLink share one HTTP port
(``--host``/``--port``); ``--fleet-api-address`` and ``--control-api-address`` are
deprecated and only matter for legacy gRPC servers that are off unless the
``FLWR_INTERNAL_GRPC_*`` variables are set (we unset them). A SuperNode's own Runtime API
(for its ClientApp processes) is ``--port`` too, so each node gets its own free port.

Linux only: teardown reads ``/proc``. Run as a script, this file is that watchdog.

Example::

    with simulation_superlink(tmp_path / "link") as link:
        result = submit_run(link, app_dir, run_config={"num-server-rounds": 2},
                            num_supernodes=3, timeout=600)
    assert result.ok, result.status_details
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tomli_w
from flwr.proto.federation_config_pb2 import SimulationConfig

from fedq.common.certs import TLSFiles, make_supernode_auth_keys, make_tls_files
from fedq.server.run_status import poll_run_status

__all__ = [
    "FEDERATION_CONFIG_KEYS",
    "RunResult",
    "SuperLinkHandle",
    "SuperNode",
    "TLSFiles",
    "deployment_superlink",
    "free_port",
    "kill_serverapp",
    "make_supernode_auth_keys",
    "make_tls_files",
    "node_pids",
    "run_tagged",
    "signal_serverapp",
    "simulation_superlink",
    "start_supernode",
    "submit_run",
]

ConfigValue = bool | int | float | str

#: Keys ``flwr run --federation-config`` accepts (simulation only), e.g. ``num-supernodes``,
#: ``client-resources-num-cpus`` (int), ``client-resources-num-gpus`` (float),
#: ``init-args-num-cpus``, ``init-args-logging-level`` (str), ``verbose`` (bool). Read from
#: the SimulationConfig proto so they follow the installed Flower, which maps ``-`` to ``_``.
FEDERATION_CONFIG_KEYS: frozenset[str] = frozenset(
    f.name.replace("_", "-") for f in SimulationConfig.DESCRIPTOR.fields
)

_HOST = "127.0.0.1"
_CONNECTION = "fedq"  # name of the SuperLink connection in each private config.toml
_TAG_VAR = "FEDQ_FLOWER_RUNTIME_TAG"
_TERM_GRACE_S = 15.0  # SIGTERM -> SIGKILL; Ray and uvicorn shut down in a few seconds
_FORCE_QUIT_AFTER_S = 3.0  # uvicorn waits for open streams until a second signal
_STARTUP_ATTEMPTS = 3  # a free port can be taken between probing and binding it
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_NODE_REGISTERED = re.compile(r"SuperNode ID: (\d+)")

# Environment that must not leak into our processes: a RAY_ADDRESS would attach the
# simulation to a foreign Ray cluster; the FLWR_INTERNAL_* switches start legacy gRPC
# servers on the fixed default ports 9092/9093.
_SCRUBBED_ENV = (
    "RAY_ADDRESS",
    "FLWR_INTERNAL_GRPC_CONTROL_API",
    "FLWR_INTERNAL_GRPC_FLEET_API",
    _TAG_VAR,
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process can still take it before ours binds it; the SuperLink starter then
    retries on a new port (a SuperNode would exit, which :meth:`SuperNode.wait_registered`
    reports).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunResult:
    """Outcome of one ``flwr run``.

    ``returncode`` is the CLI's exit status, which is 0 even when the ServerApp raised;
    ``status`` (``finished:completed``, ``finished:failed``, ``finished:stopped``, or a
    non-final status after a timeout) comes from the SuperLink and says what happened.
    """

    returncode: int
    run_id: int | None
    status: str | None
    status_details: str | None
    output: str
    timed_out: bool
    log_path: Path | None

    @property
    def ok(self) -> bool:
        """True only if the CLI succeeded and the run finished as completed."""
        return self.returncode == 0 and self.status == "finished:completed"


@dataclass(eq=False)
class SuperLinkHandle:
    """A running SuperLink and everything started against it.

    ``address`` is ``127.0.0.1:<port>``, the one port that serves the Control, Fleet and
    Runtime APIs. ``flwr_home`` holds ``config.toml`` with the connection ``connection``
    that the ``flwr`` CLI uses, and the FABs the SuperLink installs.
    """

    address: str
    workdir: Path
    flwr_home: Path
    log_path: Path
    simulation: bool
    tls: TLSFiles | None
    connection: str
    _group: _ProcessGroup = field(repr=False)
    _env: dict[str, str] = field(repr=False)
    _supernodes: list[SuperNode] = field(default_factory=list, repr=False)
    _flags: list[str] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counter: int = field(default=0, repr=False)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The ``flower-superlink`` process."""
        return self._group.root

    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter


class SuperNode:
    """One ``flower-supernode`` process and its SuperExec / ClientApp children.

    Each node has its own ``FLWR_HOME`` (as a separate device would) and its own Runtime
    API port. :meth:`stop` with ``kill=True`` SIGKILLs the whole tree at once, the way a
    device that loses power disappears; :meth:`restart` starts it again with the same
    node config (the SuperLink registers it under a new node ID).
    """

    def __init__(self, handle: SuperLinkHandle, name: str, workdir: Path,
                 command_tail: list[str], env: dict[str, str],
                 program: str = "flower-supernode") -> None:
        self.name = name
        self.program = program
        self.workdir = workdir
        self.log_path = workdir / "supernode.log"
        self._handle = handle
        self._command_tail = command_tail
        self._env = env
        self._group: _ProcessGroup | None = None
        self._log_offset = 0
        self.port = 0

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The current ``flower-supernode`` process (replaced by :meth:`restart`)."""
        if self._group is None:
            raise RuntimeError(f"SuperNode {self.name} was never started")
        return self._group.root

    @property
    def alive(self) -> bool:
        """Whether the ``flower-supernode`` process is running."""
        return self._group is not None and self._group.root.poll() is None

    def start(self) -> None:
        """Start the node on a fresh Runtime API port; a no-op if it is running."""
        if self.alive:
            return
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.port = free_port()
        command = [_executable(self.program), *self._command_tail,
                   "--port", str(self.port)]
        tag = f"{self._env[_TAG_VAR]}/{self.name}-{self._handle._next_id()}"
        self._group = _ProcessGroup.spawn(command, {**self._env, _TAG_VAR: tag},
                                          self.log_path)

    def stop(self, *, kill: bool = False, grace: float = _TERM_GRACE_S) -> None:
        """Stop the node and its children: gracefully, or with SIGKILL if ``kill``."""
        if self._group is not None:
            self._group.stop(kill=kill, grace=grace)

    def restart(self) -> None:
        """Stop the node gracefully if it still runs, then start it again."""
        self.stop()
        self.start()

    def wait_registered(self, timeout: float = 60.0) -> int:
        """Block until the node has registered with the SuperLink; return its node ID.

        Reads the node's own log, so it tells this start apart from earlier ones, unlike
        ``flwr supernode ls``, which lists killed nodes as online until they time out.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = ""
            if self.log_path.exists():
                with self.log_path.open("rb") as fh:
                    fh.seek(self._log_offset)
                    text = fh.read().decode(errors="replace")
            if match := _NODE_REGISTERED.search(text):
                return int(match.group(1))
            if not self.alive:
                raise RuntimeError(f"SuperNode {self.name} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNode {self.name} did not register in {timeout}s")
            time.sleep(0.2)


@contextlib.contextmanager
def simulation_superlink(workdir: Path, *,
                         startup_timeout: float = 120.0) -> Iterator[SuperLinkHandle]:
    """Run a SuperLink with the Simulation Runtime; stop it and all it spawned on exit.

    Runs are submitted with :func:`submit_run`; their virtual SuperNodes live in a Ray
    cluster private to each run, with its temp dir under a short private directory
    (Ray's Unix socket paths must stay under 108 bytes, so not under ``workdir``).
    """
    with _superlink(workdir, simulation=True, tls=None, auth_public_keys=(),
                    startup_timeout=startup_timeout) as handle:
        yield handle


@contextlib.contextmanager
def deployment_superlink(workdir: Path, *, tls: TLSFiles | None = None,
                         auth_public_keys: Sequence[Path] = (),
                         startup_timeout: float = 120.0,
                         database: Path | None = None) -> Iterator[SuperLinkHandle]:
    """Run a SuperLink for real SuperNodes; stop it and every node started on exit.

    With ``tls`` every API is served over TLS. ``auth_public_keys`` (OpenSSH ECDSA public
    key files, see :func:`make_supernode_auth_keys`) turns on SuperNode authentication
    and registers each key with ``flwr supernode register``; Flower requires TLS for it.
    ``database``: the SuperLink keeps its state (runs, nodes) in this SQLite file instead
    of in memory, so :func:`restart_superlink` can bring it back after a crash.
    """
    with _superlink(workdir, simulation=False, tls=tls, auth_public_keys=auth_public_keys,
                    startup_timeout=startup_timeout, database=database) as handle:
        yield handle


def start_supernode(handle: SuperLinkHandle, workdir: Path,
                    node_config: Mapping[str, ConfigValue], *,
                    auth_private_key: Path | None = None, name: str | None = None,
                    max_wait_time: float | None = None,
                    program: str = "flower-supernode") -> SuperNode:
    """Start a ``flower-supernode`` connected to a deployment SuperLink.

    ``node_config`` (e.g. ``{"partition-id": 0, "num-partitions": 2}``) reaches the
    ClientApp as ``context.node_config``; it is written to a TOML file so any string value
    survives, which ``--node-config 'k="v"'`` cannot promise. The node trusts the
    SuperLink's CA when the SuperLink uses TLS. ``max_wait_time`` bounds how long it keeps
    reconnecting to a SuperLink that is gone (default: forever). The node is stopped when
    the SuperLink's context exits, or earlier with :meth:`SuperNode.stop`. ``program``:
    ``flower-supernode``, or ``fedq-supernode`` (the same with prompt polling:
    client/supernode.py).
    """
    if handle.simulation:
        raise ValueError("SuperNodes connect to a deployment SuperLink, not a simulation one")
    name = name or f"supernode-{handle._next_id()}"
    workdir.mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    tail = ["--superlink", handle.address, "--isolation", "subprocess"]
    if node_config:
        tail += ["--node-config", str(_write_toml(workdir / "node-config.toml", node_config))]
    tail += ["--root-certificates", str(handle.tls.ca_cert)] if handle.tls else ["--insecure"]
    if auth_private_key is not None:
        tail += ["--auth-supernode-private-key", str(auth_private_key)]
    if max_wait_time is not None:
        tail += ["--max-wait-time", str(max_wait_time)]
    node = SuperNode(handle, name, workdir, tail, {**handle._env, "FLWR_HOME": str(flwr_home)},
                     program)
    with handle._lock:
        handle._supernodes.append(node)
    node.start()
    return node


def run_tagged(handle: SuperLinkHandle, command: Sequence[str], *,
               env: Mapping[str, str] | None = None, timeout: float = 600.0,
               log_path: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command (e.g. ``fedq-submit`` as docker compose runs it) with the handle's
    environment and tag, so teardown also ends whatever it leaves behind.

    Its output goes to ``log_path`` (or is captured); after ``timeout`` seconds it and
    its children are killed and ``returncode`` is -9.
    """
    tag = f"{handle._env[_TAG_VAR]}/command-{handle._next_id()}"
    group = _ProcessGroup.spawn(list(command), {**handle._env, **(env or {}), _TAG_VAR: tag},
                                log_path)
    try:
        out, _ = group.root.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        group.stop(kill=True)
        out = b""
    finally:
        group.stop(kill=False)
    return subprocess.CompletedProcess(list(command), group.root.returncode, out, None)


def restart_superlink(handle: SuperLinkHandle, *, kill: bool = True,
                      startup_timeout: float = 120.0) -> None:
    """Stop the SuperLink with everything it started (its SuperExec, ServerApps), with
    SIGKILL if ``kill`` (a crash, as ``docker kill`` ends its container), and start it
    again on the same port with the same flags (its ``--database``, if it has one)."""
    handle._group.stop(kill=kill)
    port = int(handle.address.rsplit(":", 1)[1])
    command = [_executable("flower-superlink"), *handle._flags, "--host", _HOST,
               "--port", str(port)]
    deadline = time.monotonic() + startup_timeout
    while True:  # the port may stay taken for a moment after the kill
        group = _ProcessGroup.spawn(command, {**handle._env,
                                              _TAG_VAR: f"{handle._env[_TAG_VAR]}/superlink"},
                                    handle.log_path)
        if _wait_healthy(group.root, port, handle.tls, startup_timeout):
            handle._group = group
            return
        group.stop(kill=True)
        if time.monotonic() > deadline:
            raise RuntimeError(f"flower-superlink did not restart; see {handle.log_path}:\n"
                               + _tail(handle.log_path))
        time.sleep(1.0)


def kill_serverapp(handle: SuperLinkHandle) -> list[int]:
    """SIGKILL the SuperLink's ``flwr-serverapp`` processes, the way a crash of the
    server-side app would end them; return their pids."""
    return signal_serverapp(handle, signal.SIGKILL)


def signal_serverapp(handle: SuperLinkHandle, sig: signal.Signals) -> list[int]:
    """Send ``sig`` (e.g. SIGSTOP / SIGCONT for a hung server) to the SuperLink's
    ``flwr-serverapp`` processes; return their pids."""
    procs = _members(_tag_prefix(handle._env[_TAG_VAR]), [handle._group.root])
    victims = {pid: start for pid, start in procs.items() if _runs(pid, "flwr-serverapp")}
    _signal(victims, sig)
    return sorted(victims)


def node_pids(node: SuperNode, program: str | None = None) -> list[int]:
    """The live processes of a SuperNode (itself, its SuperExec, its ClientApps), or only
    those running ``program`` (e.g. ``flwr-clientapp``; with fedq-supernode's warm
    executor, ``flwr-clientapp`` also finds its forked ClientApp children and
    ``flower-superexec`` its task loop: :data:`WARM_EQUIVALENT`)."""
    if node._group is None:
        return []
    tag = node._group.tag
    procs = _members(lambda other: other == tag, [node._group.root])
    return sorted(pid for pid in procs if program is None or _runs(pid, program))


# fedq-supernode's warm executor (client/warm_executor.py) does the job of Flower's
# SuperExec and its per-message ClientApp process in forks named by their comm
WARM_EQUIVALENT = {"flower-superexec": "fedq-taskloop", "flwr-clientapp": "fedq-clientapp"}


def _runs(pid: int, program: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    if comm in (program, WARM_EQUIVALENT.get(program)):
        return True
    return any(Path(arg.decode(errors="replace")).name == program for arg in argv[:2])


def submit_run(handle: SuperLinkHandle, app_dir: Path | str, *,
               run_config: Mapping[str, ConfigValue] | None = None,
               num_supernodes: int | None = None,
               federation_config: Mapping[str, ConfigValue] | None = None,
               stream: bool = True, timeout: float = 3600.0,
               log_path: Path | None = None,
               echo: Callable[[str], str | None] | None = None) -> RunResult:
    """Run the Flower App in ``app_dir`` on ``handle`` and wait for it to finish.

    ``flwr run`` packs ``app_dir`` into a FAB (no install needed) and always runs with
    ``--stream``, since the log stream is what ends when the run does. Each line goes to
    ``log_path`` (ANSI colours stripped) and, if ``stream``, to our stdout as it arrives
    (if given, ``echo`` maps each colourless line to what to print, or None to skip it;
    without it, lines are printed as Flower wrote them, colours only on a terminal).
    ``run_config`` overrides keys of the app's ``[tool.flwr.app.config]``;
    ``num_supernodes`` and ``federation_config`` (keys in :data:`FEDERATION_CONFIG_KEYS`,
    e.g. ``client-resources-num-cpus``) configure a simulation. Both travel as TOML files,
    so strings with quotes or spaces arrive intact. After ``timeout`` seconds the run is
    stopped with ``flwr stop``. The final status is read with ``flwr ls``. A string
    ``app_dir`` is a Flower Hub app spec (``@publisher/app==x.y.z``), which the SuperLink
    fetches (and whose signatures it delivers) from ``FLWR_SUPERGRID_API_URL``.
    """
    federation = dict(federation_config or {})
    if num_supernodes is not None:
        federation["num-supernodes"] = num_supernodes
    if federation and not handle.simulation:
        raise ValueError("federation config (num-supernodes, ...) applies to simulations only")
    if unknown := sorted(set(federation) - FEDERATION_CONFIG_KEYS):
        raise ValueError(f"unknown federation config keys {unknown}; "
                         f"known: {sorted(FEDERATION_CONFIG_KEYS)}")
    submission = handle._next_id()
    app = app_dir if isinstance(app_dir, str) else str(app_dir.resolve())
    command = [_executable("flwr"), "run", app, handle.connection, "--stream"]
    if run_config:
        path = handle.workdir / f"run-{submission}-run-config.toml"
        command += ["--run-config", str(_write_toml(path, run_config))]
    if federation:
        path = handle.workdir / f"run-{submission}-federation-config.toml"
        command += ["--federation-config", str(_write_toml(path, federation))]

    env = {**handle._env, _TAG_VAR: f"{handle._env[_TAG_VAR]}/cli-{submission}"}
    lines: list[str] = []
    run_ids: list[int] = []
    cli = _ProcessGroup.spawn(command, env, None, cwd=handle.workdir)
    with contextlib.ExitStack() as stack:
        log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(log_path.open("w"))
        reader = threading.Thread(
            target=_pump, args=(cli.root.stdout, stream, log, lines, run_ids, echo),
            daemon=True)
        reader.start()
        stack.callback(reader.join, 10.0)
        stack.callback(cli.stop, kill=True)  # LIFO: on any exit, end the CLI, then the reader
        try:
            returncode = cli.root.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            if run_ids:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _flwr(handle, ["stop", str(run_ids[0]), handle.connection], timeout=120.0)
            cli.stop(kill=True)
            returncode = cli.root.wait()
    run_id = run_ids[0] if run_ids else None
    status, details = _run_status(handle, run_id) if run_id is not None else (None, None)
    return RunResult(returncode=returncode, run_id=run_id, status=status,
                     status_details=details, output="".join(lines), timed_out=timed_out,
                     log_path=log_path)


# --------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _superlink(workdir: Path, *, simulation: bool, tls: TLSFiles | None,
               auth_public_keys: Sequence[Path],
               startup_timeout: float,
               database: Path | None = None) -> Iterator[SuperLinkHandle]:
    """Start, health-check and finally tear down one SuperLink (both runtimes)."""
    if auth_public_keys and tls is None:
        raise ValueError("Flower only allows SuperNode authentication over TLS")
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "superlink.log"
    tag = uuid.uuid4().hex
    extra_env: dict[str, str] = {}
    scratch: list[Path] = []
    if simulation:
        scratch.append(Path(tempfile.mkdtemp(prefix="fedq-ray-")))
        extra_env["RAY_TMPDIR"] = str(scratch[0])
    env = _base_env(flwr_home, tag=tag, extra=extra_env)
    flags = ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    flags += ["--simulation"] if simulation else []
    flags += ["--enable-supernode-auth"] if auth_public_keys else []
    flags += ["--database", str(database)] if database is not None else []
    if tls is None:
        flags += ["--insecure"]
    else:
        flags += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile",
                  str(tls.server_cert), "--ssl-keyfile", str(tls.server_key)]

    watchdog_log = workdir / "watchdog.log"
    watchdog = _start_watchdog(tag, scratch, watchdog_log)
    try:
        group, port = _start_superlink_process(flags, env, log_path, tls, startup_timeout)
        if watchdog.poll() is not None:
            group.stop(kill=True)
            raise RuntimeError(f"the process watchdog died; see {watchdog_log}")
        handle = SuperLinkHandle(address=f"{_HOST}:{port}", workdir=workdir,
                                 flwr_home=flwr_home, log_path=log_path,
                                 simulation=simulation, tls=tls, connection=_CONNECTION,
                                 _group=group, _env=env, _flags=flags)
        try:
            connection: dict[str, str | bool] = {"address": handle.address}
            if tls is None:
                connection["insecure"] = True
            else:
                connection["root-certificates"] = str(tls.ca_cert)
            _write_toml(flwr_home / "config.toml",
                        {"superlink": {"default": _CONNECTION, _CONNECTION: connection}})
            for key in auth_public_keys:
                registered = _flwr(handle, ["supernode", "register", str(key), _CONNECTION],
                                   timeout=120.0)
                if registered.returncode != 0:
                    raise RuntimeError(f"could not register {key}:\n{registered.stdout}")
            yield handle
        finally:
            _teardown(handle)
    finally:
        # EOF tells the watchdog we are done: it re-checks that nothing is left and
        # removes the scratch dirs, then exits.
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=2 * _TERM_GRACE_S)


def _start_watchdog(tag: str, scratch: list[Path], log_path: Path) -> subprocess.Popen[bytes]:
    """Start this file as a script that sweeps ``tag``'s processes when our stdin pipe ends.

    The pipe's write end lives only in this process, so the kernel closes it when we exit
    for any reason. The watchdog runs in its own session, untagged, so no sweep hits it.
    """
    env = {k: v for k, v in os.environ.items() if k != _TAG_VAR}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            # -I: keep this file's directory (our package) off sys.path, where its module
            # names could shadow the ones flwr imports.
            [sys.executable, "-I", str(Path(__file__).resolve()), tag, *map(str, scratch)],
            env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


def _start_superlink_process(flags: list[str], env: dict[str, str], log_path: Path,
                             tls: TLSFiles | None,
                             startup_timeout: float) -> tuple[_ProcessGroup, int]:
    """Start ``flower-superlink`` on a free port and wait until ``/health`` answers.

    Retries on a new port only when the old one was taken between probing and binding.
    """
    for _attempt in range(_STARTUP_ATTEMPTS):
        port = free_port()
        command = [_executable("flower-superlink"), *flags, "--host", _HOST, "--port", str(port)]
        group = _ProcessGroup.spawn(command, {**env, _TAG_VAR: f"{env[_TAG_VAR]}/superlink"},
                                    log_path)
        try:
            if _wait_healthy(group.root, port, tls, startup_timeout):
                return group, port
        except BaseException:
            group.stop(kill=True)
            raise
        group.stop(kill=True)
        if "address already in use" not in log_path.read_text(errors="replace").lower():
            raise RuntimeError(f"flower-superlink exited at startup; see {log_path}:\n"
                               + _tail(log_path))
    raise RuntimeError(f"flower-superlink found no free port in {_STARTUP_ATTEMPTS} tries")


def _teardown(handle: SuperLinkHandle) -> None:
    """Stop nodes first (so they can sign off), then the SuperLink and any stragglers."""
    try:
        for node in handle._supernodes:
            node.stop()
    finally:
        _terminate(_tag_prefix(handle._env[_TAG_VAR]), [handle._group.root], kill=False)


def _wait_healthy(process: subprocess.Popen[bytes], port: int, tls: TLSFiles | None,
                  timeout: float) -> bool:
    """Poll ``GET /health`` until 200 (True) or the process exits (False)."""
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=str(tls.ca_cert)) if tls else None
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            with urllib.request.urlopen(f"{scheme}://{_HOST}:{port}/health", timeout=2.0,
                                        context=context) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"flower-superlink not healthy after {timeout}s")
        time.sleep(0.2)
    return False


def _base_env(flwr_home: Path, *, tag: str, extra: Mapping[str, str]) -> dict[str, str]:
    """Environment for every process of one SuperLink handle."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    bin_dir = str(Path(sys.executable).parent)  # the SuperLink spawns flower-superexec by name
    env.update({
        "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # no network; don't block on a PyPI lookup
        "FLWR_TELEMETRY_ENABLED": "0",  # same, and keeps exits fast
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",  # so log lines reach us as they happen
        _TAG_VAR: tag,
        **extra,
    })
    return env


def _executable(name: str) -> str:
    """Absolute path of a console script from this interpreter's environment."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")]))
    if path is None:
        raise FileNotFoundError(f"{name} not found; is flwr installed in {sys.prefix}?")
    return path


def _flwr(handle: SuperLinkHandle, args: list[str],
          timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short ``flwr`` CLI command against the handle's private config."""
    return subprocess.run([_executable("flwr"), *args], env=handle._env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False, start_new_session=True, cwd=handle.workdir)


def _run_status(handle: SuperLinkHandle, run_id: int) -> tuple[str | None, str | None]:
    """Return (status, details) of a run from ``flwr ls --format json``."""
    return poll_run_status(lambda: _flwr(
        handle, ["ls", handle.connection, "--run-id", str(run_id), "--format", "json"],
        timeout=60.0).stdout, attempts=10)


def _pump(pipe: IO[bytes] | None, stream: bool, log: IO[str] | None, lines: list[str],
          run_ids: list[int], echo: Callable[[str], str | None] | None = None) -> None:
    """Copy CLI output line by line to stdout, the log and ``lines``; spot the run ID."""
    if pipe is None:
        return
    for raw in iter(pipe.readline, b""):
        text = raw.decode(errors="replace")
        clean = _ANSI.sub("", text)
        if stream:
            shown = (text if sys.stdout.isatty() else clean) if echo is None else echo(clean)
            if shown is not None:
                sys.stdout.write(shown)
                sys.stdout.flush()
        lines.append(clean)
        if log is not None:
            log.write(clean)
            log.flush()
        if not run_ids and (match := _RUN_STARTED.search(clean)):
            run_ids.append(int(match.group(1)))
    pipe.close()


def _write_toml(path: Path, data: Mapping[str, object]) -> Path:
    """Write a flat config mapping (or a nested table) as TOML; reject non-TOML scalars."""
    def check(value: object, key: str) -> None:
        if isinstance(value, Mapping):
            for inner_key, inner in value.items():
                check(inner, f"{key}.{inner_key}")
        elif not isinstance(value, bool | int | float | str):
            raise TypeError(f"config value {key}={value!r} is not a bool, int, float or str")

    for key, value in data.items():
        check(value, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(data)))
    return path


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    sid: int
    start: int  # clock ticks since boot; with the pid, identifies a process over time


def _stat(pid: int) -> _Stat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return _Stat(state=fields[0], ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]))


def _tag(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{_TAG_VAR}=".encode()
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


class _ProcessGroup:
    """A process we started in its own session, with the tag that marks its descendants."""

    def __init__(self, root: subprocess.Popen[bytes], tag: str) -> None:
        self.root = root
        self.tag = tag

    @classmethod
    def spawn(cls, command: list[str], env: dict[str, str], log_path: Path | None, *,
              cwd: Path | None = None) -> _ProcessGroup:
        """Start ``command`` in a new session; output to ``log_path`` or to a pipe.

        ``flwr`` reads a positional argument as an app path when a folder of that name
        exists in its working directory, so the CLI runs in our private ``cwd``, where
        no folder is named like the connection, whatever the user's directory holds."""
        with contextlib.ExitStack() as stack:
            out: IO[bytes] | int = subprocess.PIPE
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(log_path.open("ab"))
                out.write(f"\n$ {shlex.join(command)}\n".encode())
                out.flush()
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=cwd)
        return cls(process, env[_TAG_VAR])

    def stop(self, *, kill: bool, grace: float = _TERM_GRACE_S) -> None:
        """Stop the root and everything tagged as its own (see :func:`_terminate`)."""
        tag = self.tag
        _terminate(lambda other: other == tag, [self.root], kill=kill, grace=grace)


def _tag_prefix(handle_tag: str) -> Callable[[str], bool]:
    """Match the tags of every process started for one SuperLink handle."""
    prefix = handle_tag + "/"
    return lambda tag: tag.startswith(prefix)


def _members(matches: Callable[[str], bool],
             roots: Sequence[subprocess.Popen[bytes]]) -> dict[int, int]:
    """Return {pid: start time} of the live processes that belong to a group.

    Membership is decided from ``/proc`` at the time of the call: a matching tag in the
    environment (inherited by every descendant), descent from a member, or the session of a
    member or root. Sessions catch processes that were reparented to init *and* do not show
    the tag in ``/proc/<pid>/environ`` (Ray's dashboard and runtime-env agents).
    ``flower-superexec`` starts a new session, so its session is found through its tag.
    """
    table = {int(name): st for name in os.listdir("/proc")
             if name.isdigit() and (st := _stat(int(name))) is not None}
    protected = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in protected and (st := table.get(pid)) is not None:
        protected.add(pid)
        pid = st.ppid

    # A root reaped before this call may have had its pid reused, so it no longer counts,
    # not even as a session; Linux never reuses a pid that still names a live session.
    unreaped = [root for root in roots if root.returncode is None]
    found = {root.pid for root in unreaped if root.poll() is None and root.pid in table}
    found |= {pid for pid in table if (tag := _tag(pid)) is not None and matches(tag)}
    sessions = {table[p].sid for p in found} | {root.pid for root in unreaped}
    sessions.discard(os.getsid(0))
    found |= {pid for pid, st in table.items() if st.sid in sessions}
    found -= protected
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st.ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in protected:
                found.add(child)
                stack.append(child)
    return {pid: table[pid].start for pid in found if table[pid].state not in ("Z", "X")}


def _terminate(matches: Callable[[str], bool], roots: Sequence[subprocess.Popen[bytes]], *,
               kill: bool, grace: float = _TERM_GRACE_S) -> None:
    """Signal every member of a group at once; escalate to SIGKILL after ``grace`` seconds.

    A second SIGTERM to the roots after a few seconds makes uvicorn (SuperLink, SuperNode)
    stop waiting for open log streams. Later rounds catch processes spawned meanwhile. A
    KeyboardInterrupt during the wait skips straight to SIGKILL and is re-raised once
    everything is gone.
    """
    interrupted: KeyboardInterrupt | None = None
    for _round in range(3):
        procs = _members(matches, roots)
        if not procs:
            break
        first = signal.SIGKILL if kill or interrupted else signal.SIGTERM
        _signal(procs, first)
        start = time.monotonic()
        forced = first == signal.SIGKILL
        try:
            while _alive(procs) and time.monotonic() - start < grace:
                for root in roots:
                    root.poll()  # reap our own children so they stop counting as alive
                if not forced and time.monotonic() - start > _FORCE_QUIT_AFTER_S:
                    _signal({p: s for p, s in procs.items()
                             if p in {root.pid for root in roots}}, signal.SIGTERM)
                    forced = True
                time.sleep(0.1)
        except KeyboardInterrupt as exc:
            interrupted = exc
        _signal(_alive(procs), signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for root in roots:
        with contextlib.suppress(subprocess.TimeoutExpired):
            root.wait(timeout=5.0)
    if interrupted is not None:
        raise interrupted


def _alive(procs: Mapping[int, int]) -> dict[int, int]:
    """The entries of ``procs`` that still run (same pid *and* start time, not zombies)."""
    alive = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st.start == start and st.state not in ("Z", "X"):
            alive[pid] = start
    return alive


def _signal(procs: Mapping[int, int], sig: signal.Signals) -> None:
    for pid in _alive(procs):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _watchdog_main(handle_tag: str, scratch: Sequence[str]) -> None:
    """Wait for EOF on stdin (our parent finished or died), then sweep and clean up."""
    sys.stdin.buffer.read()
    _terminate(_tag_prefix(handle_tag), [], kill=False)
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _watchdog_main(sys.argv[1], sys.argv[2:])
