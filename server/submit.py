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

from common.config import ConfigError, ConfigScalar, FedqConfig, parse_assignment
from common.flower_runtime import poll_run_status
from server.outcome import status_in_log

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
    return overrides


def write_connection(flwr_home: Path, superlink: str, root_certificates: Path | None) -> Path:
    """Make ``fedq`` the default connection of ``flwr`` in ``flwr_home``."""
    connection: dict[str, str | bool] = {"address": superlink}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                 CONNECTION: connection}}))
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
                raise TimeoutError(f"SuperLink {superlink} not healthy after {timeout}s: "
                                   f"{err}") from None
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


def register_key(public_key: Path, env: dict[str, str]) -> None:
    """``flwr supernode register``; a key registered before (a restart) is not an error."""
    done = _flwr(["supernode", "register", str(public_key), CONNECTION], env)
    if done.returncode != 0 and "already" not in done.stdout.lower():
        raise RuntimeError(f"could not register {public_key}:\n{done.stdout}")
    print(f"fedq-submit: SuperNode key {public_key} registered", flush=True)


def submit(app: Path, config_file: Path, env: dict[str, str]
           ) -> tuple[int | None, int, tuple[str, str] | None]:
    """``flwr run --stream``: echo its output; return (run id, exit status, the fedq run
    status line's (status, details) if the stream carried one)."""
    command = ["flwr", "run", str(app.resolve()), CONNECTION, "--stream",
               "--run-config", str(config_file)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    run_id, fedq_status = None, None
    assert process.stdout is not None
    for raw in iter(process.stdout.readline, b""):
        text = raw.decode(errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        plain = _ANSI.sub("", text)
        if run_id is None and (match := _RUN_STARTED.search(plain)):
            run_id = int(match.group(1))
        fedq_status = status_in_log(plain) or fedq_status
    return run_id, process.wait(), fedq_status


def run_status(run_id: int, env: dict[str, str]) -> tuple[str | None, str | None]:
    """The run's (status, details) from ``flwr ls``."""
    return poll_run_status(lambda: _flwr(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env).stdout,
        attempts=20)


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["flwr", *args], env=env, stdout=subprocess.PIPE,
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
    flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    write_connection(flwr_home, args.superlink, args.root_certificates)
    config_file = flwr_home / "fedq-run-config.toml"
    config_file.write_text(tomli_w.dumps(overrides))
    wait_healthy(args.superlink, args.root_certificates, args.wait)
    for key in public_keys(args.register_key):
        register_key(key, env)
    run_id, returncode, fedq_status = submit(args.app, config_file, env)
    if run_id is None:
        parser.exit(1, f"fedq-submit: the run did not start (flwr run exited {returncode})\n")
    status, details = run_status(run_id, env)
    print(f"fedq-submit: run {run_id}: {status} {details or ''}".rstrip(), flush=True)
    if fedq_status is not None:
        print(f"fedq-submit: run {run_id}: fedq status {fedq_status[0]} {fedq_status[1]}",
              flush=True)
    if returncode != 0 or status != "finished:completed":
        sys.exit(1)


if __name__ == "__main__":
    main()
