"""docker-compose.yml read as data, and its topology started as local Flower processes.

No Docker engine runs in CI, so the deployment tests and ``simulations.bench_deployment``
take the compose file's own commands (SuperNode node configs, the submit service's
``fedq-submit`` command line) and run them on 127.0.0.1 with
:mod:`simulations.flower_runtime`: a change to the compose file changes what they run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from flwr.common.config import parse_config_args

from fedq.server.submit import run_config
from fedq.simulations.flower_runtime import (
    SuperLinkHandle,
    SuperNode,
    TLSFiles,
    deployment_superlink,
    make_supernode_auth_keys,
    run_tagged,
    start_supernode,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
TLS_OVERRIDE = ROOT / "server" / "compose.tls.yml"
SUPERLINK_SERVICE = "superlink"
SUBMIT_SERVICE = "submit"

#: Small enough for tests: a few seconds of CartPole per device and round.
TINY_RUN = {"local-steps": 200, "learning-starts": 100, "batch-size": 32,
            "buffer-size": 2000, "hidden-sizes": "16,16", "eval-episodes": 1,
            "exploration-steps": 1000}


def load_compose(*files: Path) -> dict:
    """The compose model after merging ``files`` the way ``docker compose -f ... -f``
    does for what we use: per service, later keys replace earlier ones, except
    ``volumes``, which merge by container path."""
    merged: dict = {"services": {}}
    for path in files or (COMPOSE,):
        data = yaml.safe_load(path.read_text())
        for name, service in data.get("services", {}).items():
            target = merged["services"].setdefault(name, {})
            volumes = {_mount_target(v): v for v in target.get("volumes", [])}
            volumes.update({_mount_target(v): v for v in service.get("volumes", [])})
            target.update(service)
            if volumes:
                target["volumes"] = list(volumes.values())
        merged.update({k: v for k, v in data.items() if k != "services"})
    return merged


def _mount_target(volume: str) -> str:
    return volume.split(":")[1]


def argv(service: dict) -> list[str]:
    """The service's command line: entrypoint followed by command."""
    return [*service.get("entrypoint", []), *service.get("command", [])]


def flag_value(args: Sequence[str], flag: str) -> str:
    """The value after ``flag`` in ``args``."""
    return args[list(args).index(flag) + 1]


def supernode_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if name.startswith("supernode")}


def node_config(service: dict) -> dict:
    """A SuperNode service's ``--node-config``, parsed by Flower's own parser."""
    return parse_config_args([flag_value(argv(service), "--node-config")])


def submit_overrides(compose: dict) -> dict:
    """The run config the submit service sets (``--set KEY=VALUE``), as fedq-submit
    reads it (compose's ``${VAR:-default}`` variables at their defaults)."""
    args = [interpolate(a) for a in argv(compose["services"][SUBMIT_SERVICE])]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return run_config(None, sets)


_VARIABLE = re.compile(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}")


def interpolate(arg: str) -> str:
    """Compose's ``${VAR:-default}`` as an environment without ``VAR`` leaves it: the
    compose file's own defaults, whatever the calling shell has set."""
    return _VARIABLE.sub(lambda m: m.group(1), arg)


@dataclass
class Topology:
    """The compose federation on 127.0.0.1: SuperLink, SuperNodes, where they write."""

    link: SuperLinkHandle
    nodes: dict[str, SuperNode]
    state_dirs: dict[str, Path]
    workdir: Path
    compose: dict

    def submit_command(self, run_dir: Path, overrides: dict) -> list[str]:
        """The submit service's command with local addresses, run-dir and overrides."""
        args = [interpolate(a) for a in argv(self.compose["services"][SUBMIT_SERVICE])]
        service_address = flag_value(args, "--superlink")
        args = [self.link.address if a == service_address else a for a in args]
        args[args.index("--app") + 1] = str(ROOT)
        if "--root-certificates" in args:
            assert self.link.tls is not None
            args[args.index("--root-certificates") + 1] = str(self.link.tls.ca_cert)
        if "--register-key" in args:
            args[args.index("--register-key") + 1] = str(self.workdir / "public-keys")
        for key, value in {**overrides, "run-dir": str(run_dir)}.items():
            args += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        return args

    def submit(self, run_dir: Path, overrides: dict, *, log_name: str,
               timeout: float = 600.0) -> int:
        """Run the submit service's command; return its exit status."""
        command = self.submit_command(run_dir, overrides)
        done = run_tagged(self.link, command, timeout=timeout,
                          env={"FLWR_HOME": str(self.workdir / "submit-flwr-home")},
                          log_path=self.workdir / log_name)
        return done.returncode


@contextlib.contextmanager
def compose_topology(workdir: Path, *, tls: TLSFiles | None = None, auth: bool = False,
                     node_extra: dict | None = None,
                     node_extras: dict[str, dict] | None = None,
                     supernode_program: str | None = None,
                     database: Path | None = None) -> Iterator[Topology]:
    """Start the compose file's SuperLink and SuperNodes locally (TLS and node auth as
    ``server/compose.tls.yml`` turns them on); each node's state-dir moves under
    ``workdir`` and keeps its name. ``node_extra`` adds keys to every node's config
    (e.g. a ``message-audit-dir``, which a device takes only from its own node config);
    ``node_extras`` adds keys to the named nodes' only (e.g. DP on one device).
    Each node runs its service's entrypoint (``fedq-supernode``) unless
    ``supernode_program`` names another (``flower-supernode``: Flower's 3 s polling);
    ``database``: the SuperLink's ``--database`` file, as the compose file gives it one."""
    files = (COMPOSE, TLS_OVERRIDE) if tls else (COMPOSE,)
    compose = load_compose(*files)
    nodes_spec = supernode_services(compose)
    keys: dict[str, Path] = {}
    public: list[Path] = []
    if auth:
        for name, service in nodes_spec.items():
            key_name = Path(flag_value(argv(service), "--auth-supernode-private-key")).name
            keys[name], pub = make_supernode_auth_keys(workdir / "public-keys", key_name)
            public.append(pub)
    with deployment_superlink(workdir / "link", tls=tls, auth_public_keys=public,
                              database=database) as link:
        nodes: dict[str, SuperNode] = {}
        state_dirs: dict[str, Path] = {}
        for name, service in nodes_spec.items():
            config = node_config(service)
            state_dirs[name] = workdir / "devices" / Path(config["state-dir"]).name
            config["state-dir"] = str(state_dirs[name])
            config.update(node_extra or {})
            config.update((node_extras or {}).get(name, {}))
            nodes[name] = start_supernode(link, workdir / name, config, name=name,
                                          auth_private_key=keys.get(name),
                                          program=supernode_program or argv(service)[0])
        for node in nodes.values():
            node.wait_registered(timeout=120)
        yield Topology(link, nodes, state_dirs, workdir, compose)


def executable(name: str) -> str | None:
    """A console script of this environment (the image puts them on PATH), or None."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                    os.environ.get("PATH", "")]))
