"""``fedq-client``: join a device (a Raspberry Pi, a laptop, a container) to a federation.

Wraps ``flower-supernode`` (as ``fedq-supernode``: :mod:`client.supernode`, which polls
the SuperLink every ``FEDQ_SUPERNODE_POLL_S`` = 0.2 s instead of every 3 s) so one command
gives a device everything it needs::

    fedq-client --server 192.168.1.10:9093 --state-dir ~/fedq-state \\
        --env-id CartPole-v1 --set seed=7 --set env-physics='{"length": 0.3}' \\
        --root-certificates ca.crt --auth-key node-1

* The device's settings (``--env-id``, ``--set KEY=VALUE`` for any fedq config key) are
  validated with :class:`~common.config.FedqConfig`, and the env is built once, *before*
  anything connects: a typo fails here with the config field it concerns, not later
  inside a round on the server's clock.
* ``--state-dir`` is required and written into the node config as ``state-dir``. The
  device keeps its replay buffer, step counters, RNGs and privacy accountant there
  (:class:`common.trainer.LocalTrainer`), so they survive restarts. Without it the
  ClientApp would fall back to ``<run-dir>/devices/node-<id>``, and the SuperLink hands
  out a new node id every time a SuperNode (re)starts: the device would start from
  scratch after every reboot. Flower's own files (``FLWR_HOME``) go under it too, unless
  ``--flwr-home`` says otherwise.
* ``--local-port`` is the SuperNode's local Runtime API port (127.0.0.1, default 9094),
  which its ClientApp processes dial: two devices on one host need two ports.
* TLS is the default: ``--root-certificates`` names the CA that signed the SuperLink's
  certificate (see ``fedq-certs``). Plain text needs an explicit ``--insecure`` and is
  announced on stderr. ``--auth-key`` is the device's private key for SuperNode
  authentication (its public key must be registered at the SuperLink).
* The device's privacy policy (``--set privacy-...=...``, :mod:`common.privacy_policy`)
  is validated here too; the server's run config can tighten it, never loosen it.
* ``--trusted-entities FILE`` makes the SuperNode run only app bundles (FABs) signed by
  one of the Ed25519 keys in FILE (Flower's own mechanism: a YAML map of public key id
  to ``ssh-ed25519 ...`` key). Without it the device installs and runs whatever app the
  SuperLink sends, and that code can read the device's state directory. Flower verifies
  the signatures the SuperLink delivers with the FAB; a SuperLink that delivers none
  (a self-hosted ``flower-superlink`` without app verification) gets every run refused.

The process becomes ``fedq-supernode``, i.e. Flower's ``flower-supernode`` (``exec``), so
a service manager's signals reach Flower directly. ``--print-command`` shows the command
instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomli_w

from fedq.client.supernode import poll_interval
from fedq.common.config import ConfigError, ConfigScalar, FedqConfig, parse_assignment
from fedq.common.envs import run_env_spec
from fedq.common.privacy_policy import PrivacyPolicy

NODE_CONFIG_FILE = "node-config.toml"
# flower-supernode's local Runtime API (127.0.0.1 only), which its ClientApp processes
# dial; two devices on one host need two ports.
DEFAULT_LOCAL_PORT = 9094


def device_node_config(env_id: str | None, assignments: Sequence[str],
                       state_dir: Path) -> dict[str, ConfigScalar]:
    """The node config of a device, checked as the ClientApp will read it.

    Validates the keys and values with :class:`FedqConfig` and builds the env once (env
    id, kwargs and physics overrides); raises :class:`ConfigError` naming the field.
    """
    node: dict[str, ConfigScalar] = dict(parse_assignment(a) for a in assignments)
    if env_id is not None:
        node["env-id"] = env_id
    if "state-dir" in node:
        raise ConfigError("state-dir", "set it with --state-dir, not --set")
    node["state-dir"] = str(state_dir.expanduser().resolve())
    config = FedqConfig.from_mapping(node)
    PrivacyPolicy.from_mapping(node)
    run_env_spec(config)
    return node


def check_trusted_entities(path: Path) -> Path:
    """``path`` resolved if it is what ``flower-supernode --trusted-entities`` accepts: a
    YAML map of public key ids to Ed25519 public keys in OpenSSH form; ValueError naming
    the file and the entry otherwise (Flower would only exit once started)."""
    import yaml
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = _existing(path)
    try:
        entities = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--trusted-entities {path}: not YAML ({err})") from None
    if not isinstance(entities, dict) or not entities:
        raise ValueError(f"--trusted-entities {path}: expected a non-empty map of public "
                         "key ids to 'ssh-ed25519 ...' public keys")
    for key_id, key in entities.items():
        try:
            public = load_ssh_public_key(str(key).encode())
        except (ValueError, TypeError):
            public = None
        if not isinstance(public, Ed25519PublicKey):
            raise ValueError(f"--trusted-entities {path}: entry '{key_id}' is not an "
                             "Ed25519 public key ('ssh-ed25519 AAAA...')")
    return path


def supernode_command(server: str, node_config_path: Path, *,
                      root_certificates: Path | None, auth_key: Path | None,
                      insecure: bool, max_wait_time: float | None,
                      local_port: int = DEFAULT_LOCAL_PORT,
                      trusted_entities: Path | None = None) -> list[str]:
    """The ``fedq-supernode`` (``flower-supernode`` with prompt polling) command line for
    a device (see the module docstring)."""
    if root_certificates is not None and insecure:
        raise ValueError("--insecure contradicts --root-certificates; choose one")
    if root_certificates is None and not insecure:
        raise ValueError("give --root-certificates CA.crt (TLS), or --insecure to send "
                         "weights and metrics in plain text")
    if auth_key is not None and root_certificates is None:
        raise ValueError("--auth-key needs TLS: Flower only authenticates SuperNodes over "
                         "TLS, so give --root-certificates too")
    if not 1 <= local_port <= 65535:
        raise ValueError(f"--local-port {local_port}: not a TCP port (1-65535)")
    command = ["fedq-supernode", "--superlink", server, "--isolation", "subprocess",
               "--node-config", str(node_config_path), "--port", str(local_port)]
    if root_certificates is not None:
        command += ["--root-certificates", str(_existing(root_certificates))]
    else:
        command += ["--insecure"]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(_existing(auth_key))]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    if trusted_entities is not None:
        command += ["--trusted-entities", str(check_trusted_entities(trusted_entities))]
    return command


def write_node_config(state_dir: Path, node: Mapping[str, ConfigScalar]) -> Path:
    """Write the node config as TOML into the state dir (``--node-config`` takes a file,
    so JSON strings with quotes and spaces arrive intact)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / NODE_CONFIG_FILE
    path.write_text(tomli_w.dumps(dict(node)))
    return path


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    return path.resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq-client",
        description="Join this device to a fedq federation as a Flower SuperNode.")
    parser.add_argument("--server", required=True,
                        help="SuperLink address HOST:PORT (the port of flower-superlink's "
                        "--port, 9093 in docker-compose.yml)")
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="where this device keeps its replay buffer, counters and privacy "
                        "accountant; must survive restarts")
    parser.add_argument("--env-id", help="gymnasium env id of this device (default: the "
                        "run's env-id)")
    parser.add_argument("--set", dest="assignments", action="append", default=[],
                        metavar="KEY=VALUE", help="override a fedq config key for this "
                        "device (repeatable), e.g. --set seed=3 --set "
                        "env-physics='{\"length\": 0.3}'")
    parser.add_argument("--root-certificates", type=Path,
                        help="CA certificate that signed the SuperLink's TLS certificate")
    parser.add_argument("--auth-key", type=Path,
                        help="this device's private key for SuperNode authentication")
    parser.add_argument("--insecure", action="store_true",
                        help="connect without TLS (only on a network you trust)")
    parser.add_argument("--max-wait-time", type=float,
                        help="give up after this many seconds without a SuperLink "
                        "(default: keep retrying)")
    parser.add_argument("--local-port", type=int, default=DEFAULT_LOCAL_PORT,
                        help="port of the SuperNode's local Runtime API on 127.0.0.1, which "
                        "its ClientApp processes use; give each device on one host its own "
                        f"(default {DEFAULT_LOCAL_PORT})")
    parser.add_argument("--flwr-home", type=Path,
                        help="Flower's own files for this node (default: STATE_DIR/flwr-home)")
    parser.add_argument("--trusted-entities", type=Path, metavar="YAML_FILE",
                        help="run only app bundles signed by one of these Ed25519 keys "
                        "(Flower's trusted entities: a YAML map of key id to 'ssh-ed25519 "
                        "...' public key); without it the device runs any app the "
                        "SuperLink sends")
    parser.add_argument("--print-command", action="store_true",
                        help="print the fedq-supernode command (with its FLWR_HOME) "
                        "instead of running it")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Validate the device's settings, then become ``fedq-supernode``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        node = device_node_config(args.env_id, args.assignments, args.state_dir)
        state_dir = Path(str(node["state-dir"]))
        command = supernode_command(
            args.server, state_dir / NODE_CONFIG_FILE, root_certificates=args.root_certificates,
            auth_key=args.auth_key, insecure=args.insecure, max_wait_time=args.max_wait_time,
            local_port=args.local_port, trusted_entities=args.trusted_entities)
        poll_interval(os.environ)  # FEDQ_SUPERNODE_POLL_S, checked before exec
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"fedq-client: error: {err}\n")
    if args.insecure:
        print("fedq-client: WARNING: --insecure: no TLS; model weights, metrics and the "
              "node's identity travel in plain text", file=sys.stderr)
    write_node_config(state_dir, node)
    flwr_home = (args.flwr_home or state_dir / "flwr-home").expanduser().resolve()
    if args.print_command:
        print(shlex.join([f"FLWR_HOME={flwr_home}", *command]))
        return
    os.environ["FLWR_HOME"] = str(flwr_home)
    executable = shutil.which("fedq-supernode",
                              path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")]))
    if executable is None:
        parser.exit(2, "fedq-client: error: fedq-supernode not found; install fedq "
                    "(pip install .) in this environment\n")
    os.execv(executable, [executable, *command[1:]])


if __name__ == "__main__":
    main()
