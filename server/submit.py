"""``fedq-submit``: submit the fedq app to a running SuperLink and wait for the run's outcome.

``flwr run`` alone is awkward as a one-shot deployment step: it reads the SuperLink
address from ``$FLWR_HOME/config.toml`` rather than from flags, it fails at once if the
SuperLink is still starting, it cannot register SuperNode keys, and ``flwr run --stream``
exits 0 even when the ServerApp raised. This wrapper does what docker compose's
``submit`` service needs, in order:

1. validate the run config (``--run-config FILE`` and ``--set KEY=VALUE``) with
   :class:`~common.config.FedqConfig`, so a typo fails before anything is sent;
2. write a ``fedq`` connection (address, TLS root certificate or insecure) into
   ``$FLWR_HOME/config.toml``;
3. wait until the SuperLink answers ``/health``;
4. register SuperNode public keys (``--register-key``) when node authentication is on
   (a key that is already registered is fine, so restarts are idempotent);
5. ``flwr run APP fedq --stream --run-config FILE``, then read the run's final status
   with ``flwr ls`` and exit 0 only for ``finished:completed``; the ServerApp's own
   ``[fedq] run status:`` line (ok, degraded, failed: server/outcome.py) is repeated
   at the end, so a degraded run is reported even though it completed.

To resume a run whose server side died, submit again with ``--set resume=true`` and the
same ``run-dir``: the ServerApp continues at the round after its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from fedq.common.atomic import atomic_write_text
from fedq.common.config import ConfigError, ConfigScalar, FedqConfig, parse_assignment
from fedq.common.privacy_policy import PrivacyPolicy
from fedq.server.outcome import status_in_log
from fedq.server.run_status import poll_run_status

CONNECTION = "fedq"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def run_config(path: Path | None, assignments: Sequence[str]) -> dict[str, ConfigScalar]:
    """The run-config overrides from a TOML file and ``KEY=VALUE`` pairs, validated."""
    overrides: dict[str, ConfigScalar] = {}
    if path is not None:
        overrides.update(tomllib.loads(path.read_text()))
    overrides.update(dict(parse_assignment(a) for a in assignments))
    FedqConfig.from_mapping(overrides)
    PrivacyPolicy.from_mapping(overrides)  # privacy-* keys: tighten the devices' policies
    return overrides


def write_connection(flwr_home: Path, superlink: str, root_certificates: Path | None) -> Path:
    """Add (or update) the ``fedq`` connection in ``flwr_home/config.toml``, keeping the
    user's other connections and their default; ``fedq`` becomes the default only of a
    config that has none. fedq-submit names the connection in every command anyway."""
    connection: dict[str, str | bool] = {"address": superlink}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    try:
        existing = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    links = existing.setdefault("superlink", {})
    if not isinstance(links, dict):
        raise ValueError(f"{path}: [superlink] is not a table; fix or remove it")
    links[CONNECTION] = connection
    links.setdefault("default", CONNECTION)
    atomic_write_text(path, tomli_w.dumps(existing))
    return path


def wait_healthy(superlink: str, root_certificates: Path | None, timeout: float) -> None:
    """Poll the SuperLink's ``/health`` until it answers 200 or ``timeout`` passes."""
    scheme = "https" if root_certificates else "http"
    context = (ssl.create_default_context(cafile=str(root_certificates))
               if root_certificates else None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{superlink}/health", timeout=5.0,
                                        context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            if time.monotonic() > deadline:
                raise SuperLinkUnreachable(
                    f"SuperLink {superlink} did not answer /health within {timeout:g} s "
                    f"({getattr(err, 'reason', err)}); is it running, and is --superlink "
                    "its host:port (and --insecure / --root-certificates its mode)?"
                ) from None
        time.sleep(1.0)


def public_keys(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories expanded to their ``*.pub`` files."""
    keys: list[Path] = []
    for path in paths:
        if path.is_dir():
            keys += sorted(path.glob("*.pub"))
        elif path.is_file():
            keys.append(path)
        else:
            raise FileNotFoundError(f"--register-key {path}: no such file or directory")
    return keys


def register_key(public_key: Path, env: dict[str, str], cwd: Path) -> None:
    """``flwr supernode register``; a key registered before (a restart) is not an error."""
    done = _flwr(["supernode", "register", str(public_key.resolve()), CONNECTION], env, cwd)
    if done.returncode != 0 and "already" not in done.stdout.lower():
        raise RuntimeError(f"could not register {public_key}:\n{done.stdout}")
    print(f"fedq-submit: SuperNode key {public_key} registered", flush=True)


class SuperLinkUnreachable(RuntimeError):
    """The SuperLink did not become healthy in time."""


class Submission:
    """One ``flwr run --stream``, which can be ended cleanly from a signal handler.

    ``flwr run --stream`` only follows the run: ending it leaves the run (and its
    ServerApp) going on the SuperLink. So :meth:`cancel` stops the run with
    ``flwr stop`` too, once its id is known.
    """

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.run_id: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.fedq_status: tuple[str, str] | None = None  # the run's '[fedq] run status'

    def stream(self, app: Path, config_file: Path) -> int:
        """Submit, echo the run's log as plain text when not on a terminal, and return
        ``flwr run``'s exit status; the run id is kept in :attr:`run_id`."""
        command = ["flwr", "run", str(app.resolve()), CONNECTION, "--stream",
                   "--run-config", str(config_file)]
        self.process = subprocess.Popen(command, env=self.env, cwd=self.cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            text = raw.decode(errors="replace")
            clean = _ANSI.sub("", text)
            # the run id first, then the echo: whoever reads "started run N" and stops us
            # at once must find N known, or cancel() could not stop the run
            if self.run_id is None and (match := _RUN_STARTED.search(clean)):
                self.run_id = int(match.group(1))
            self.fedq_status = status_in_log(clean) or self.fedq_status
            sys.stdout.write(text if sys.stdout.isatty() else clean)
            sys.stdout.flush()
        return self.process.wait()

    def cancel(self) -> None:
        """Stop following the run and stop the run itself on the SuperLink."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.run_id is not None:
            stopped = _flwr(["stop", str(self.run_id), CONNECTION], self.env, self.cwd)
            print(f"fedq-submit: run {self.run_id} stopped on the SuperLink"
                  if stopped.returncode == 0 else
                  f"fedq-submit: could not stop run {self.run_id}:\n{stopped.stdout}",
                  file=sys.stderr, flush=True)


class _Terminated(Exception):
    """SIGTERM arrived (``docker stop``, a service manager)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def run_status(run_id: int, env: dict[str, str], cwd: Path) -> tuple[str | None, str | None]:
    """The run's (status, details) from ``flwr ls``."""
    return poll_run_status(lambda: _flwr(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, cwd).stdout,
        attempts=20)


def _flwr(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A short ``flwr`` command. It runs in ``cwd`` (the Flower home): ``flwr`` reads a
    positional argument as an app path when a folder of that name is in its working
    directory, and the user's directory may well hold a folder named ``fedq``."""
    return subprocess.run(["flwr", *args], env=env, stdout=subprocess.PIPE, cwd=cwd,
                          stderr=subprocess.STDOUT, text=True, check=False, timeout=120)


def main(argv: Sequence[str] | None = None) -> None:
    """Validate, connect, register keys, submit, and exit with the run's outcome."""
    parser = argparse.ArgumentParser(
        prog="fedq-submit", description="Submit the fedq app to a SuperLink and wait for it.")
    parser.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    parser.add_argument("--app", type=Path, default=Path("."),
                        help="the fedq project directory (with pyproject.toml)")
    parser.add_argument("--run-config", type=Path, help="TOML file of run-config overrides")
    parser.add_argument("--set", dest="assignments", action="append", default=[],
                        metavar="KEY=VALUE", help="run-config override (repeatable)")
    parser.add_argument("--root-certificates", type=Path,
                        help="CA certificate of the SuperLink's TLS certificate")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS")
    parser.add_argument("--register-key", type=Path, action="append", default=[],
                        help="SuperNode public key to register first, or a directory whose "
                        "*.pub files are registered (repeatable; needs "
                        "--enable-supernode-auth at the SuperLink)")
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for the SuperLink to become healthy")
    args = parser.parse_args(argv)
    if (args.root_certificates is None) == (not args.insecure):
        parser.error("give exactly one of --root-certificates and --insecure")
    try:
        overrides = run_config(args.run_config, args.assignments)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as err:
        parser.exit(2, f"fedq-submit: error: {err}\n")
    if args.insecure:
        print("fedq-submit: WARNING: --insecure: the run's config and results travel in "
              "plain text", file=sys.stderr)
    flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).resolve()
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    try:
        write_connection(flwr_home, args.superlink, args.root_certificates)
        config_file = flwr_home / "fedq-run-config.toml"
        config_file.write_text(tomli_w.dumps(overrides))
        wait_healthy(args.superlink, args.root_certificates, args.wait)
        for key in public_keys(args.register_key):
            register_key(key, env, flwr_home)
    except (SuperLinkUnreachable, ValueError, OSError, RuntimeError) as err:
        parser.exit(1, f"fedq-submit: error: {err}\n")
    submission = Submission(env, flwr_home)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        returncode = submission.stream(args.app, config_file)
    except (_Terminated, KeyboardInterrupt) as stop:
        submission.cancel()
        sys.exit(143 if isinstance(stop, _Terminated) else 130)
    if submission.run_id is None:
        parser.exit(1, f"fedq-submit: the run did not start (flwr run exited {returncode})\n")
    status, details = run_status(submission.run_id, env, flwr_home)
    print(f"fedq-submit: run {submission.run_id}: {status} {details or ''}".rstrip(), flush=True)
    if submission.fedq_status is not None:
        print(f"fedq-submit: run {submission.run_id}: fedq status "
              f"{submission.fedq_status[0]} {submission.fedq_status[1]}", flush=True)
    if returncode != 0 or status != "finished:completed":
        sys.exit(1)


if __name__ == "__main__":
    main()
