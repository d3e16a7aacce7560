"""docker-compose.yml, its TLS override and the Dockerfile, checked against the code.

Without a Docker engine (the default CI has none), this protects what `docker compose up`
would trip over: a command that does not exist or a flag the installed Flower rejects,
ports that do not line up or are open beyond loopback, a node config the ClientApp would
refuse, volumes that miss where the apps write, a second `up` that refuses its own run
directory, a TLS override that forgets a node or hands out private keys, and an image
that pulls CUDA torch. It also covers the edge-client and certificate scripts the
deployment relies on. tests/test_compose_check.py runs the file under a real engine."""

import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from flwr.app import Context, RecordDict

from fedq.client.device import device_from_context
from fedq.client.edge import main as client_main
from fedq.client.edge import supernode_command
from fedq.common.certs import main as certs_main
from fedq.common.config import FedqConfig
from fedq.common.envs import env_spec
from fedq.server.submit import main as submit_main
from fedq.server.submit import write_connection
from fedq.simulations.compose_topology import (
    COMPOSE,
    ROOT,
    SUBMIT_SERVICE,
    SUPERLINK_SERVICE,
    TLS_OVERRIDE,
    argv,
    executable,
    flag_value,
    interpolate,
    load_compose,
    node_config,
    submit_overrides,
    supernode_services,
)
from fedq.simulations.flower_runtime import free_port

PLAIN = load_compose(COMPOSE)
TLS = load_compose(COMPOSE, TLS_OVERRIDE)


@cache
def _help(command: str) -> str:
    path = executable(command)
    assert path, f"{command} is not installed in this environment"
    done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@pytest.mark.slow  # starts every Flower CLI of the compose file for its --help (~9 s on 2 cores)
@pytest.mark.parametrize("compose", [PLAIN, TLS], ids=["plain", "tls"])
def test_every_service_command_exists_and_its_flags_are_accepted(compose):
    for name, service in compose["services"].items():
        args = argv(service)
        assert args, f"{name} has no command"
        help_text = _help(args[0])
        for flag in _flags(args):
            assert re.search(rf"{re.escape(flag)}\b", help_text), \
                f"service {name}: {args[0]} does not accept {flag}"


@pytest.mark.parametrize("compose", [PLAIN, TLS], ids=["plain", "tls"])
def test_ports_line_up_between_superlink_nodes_and_submitter(compose):
    superlink = argv(compose["services"][SUPERLINK_SERVICE])
    port = flag_value(superlink, "--port")
    assert flag_value(superlink, "--host") == "0.0.0.0"  # reachable from other containers
    published = [p.split(":")[-1] for p in compose["services"][SUPERLINK_SERVICE]["ports"]]
    assert port in published
    for name, service in [*supernode_services(compose).items(),
                          (SUBMIT_SERVICE, compose["services"][SUBMIT_SERVICE])]:
        assert flag_value(argv(service), "--superlink") == f"{SUPERLINK_SERVICE}:{port}", name


def test_at_least_three_supernodes_each_with_a_valid_distinct_device_config():
    nodes = supernode_services(PLAIN)
    assert len(nodes) >= 3
    run_config = {**FedqConfig().to_mapping(), **submit_overrides(PLAIN)}
    devices = []
    for name, service in nodes.items():
        context = Context(run_id=1, node_id=7, node_config=node_config(service),
                          state=RecordDict(), run_config=run_config)
        device = device_from_context(context)  # what the ClientApp does with it
        env_spec(device.config.env_id, device.config.env_kwargs,
                 device.config.env_physics)
        assert device.partition == -1, f"{name}: a real device has no partition id"
        devices.append(device)
    assert len({d.seed for d in devices}) == len(devices)
    assert len({d.state_dir for d in devices}) == len(devices)
    assert len({(d.config.env_id, str(d.config.env_kwargs), str(d.config.env_physics))
                for d in devices}) == len(devices), "devices should differ in their env"


def test_volumes_hold_what_the_apps_write():
    declared = set(PLAIN["volumes"])
    superlink_mounts = {v.split(":")[1]: v.split(":")[0]
                        for v in PLAIN["services"][SUPERLINK_SERVICE]["volumes"]}
    run_dir = Path(submit_overrides(PLAIN)["run-dir"])
    assert any(run_dir.is_relative_to(target) and source in declared
               for target, source in superlink_mounts.items()), \
        "the ServerApp runs in the SuperLink container: run-dir must be on its volume"
    database = Path(flag_value(argv(PLAIN["services"][SUPERLINK_SERVICE]), "--database"))
    assert any(database.is_relative_to(t) for t in superlink_mounts)
    for name, service in supernode_services(PLAIN).items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        state_dir = Path(node_config(service)["state-dir"])
        assert state_dir.is_absolute()
        assert any(state_dir.is_relative_to(t) and s in declared for t, s in mounts.items()), \
            f"{name}: state-dir {state_dir} is not on a volume"


def test_submitter_validates_and_waits_for_every_node():
    overrides = submit_overrides(PLAIN)
    assert overrides["min-available-clients"] == len(supernode_services(PLAIN))
    assert set(PLAIN["services"][SUBMIT_SERVICE]["depends_on"]) == {
        SUPERLINK_SERVICE, *supernode_services(PLAIN)}
    assert "--insecure" in argv(PLAIN["services"][SUBMIT_SERVICE])
    assert any("FEDQ_RESUME" in a for a in argv(PLAIN["services"][SUBMIT_SERVICE]))
    assert interpolate("resume=${FEDQ_RESUME:-false}") == "resume=false"


def test_a_second_up_continues_the_run_in_the_volume_instead_of_refusing_it():
    """`docker compose up` twice reuses the `runs` volume: with resume=false the ServerApp
    refuses the run-dir that the first `up` filled and submit exits 1. The default
    resumes (a fresh run-dir starts fresh); FEDQ_RUN names a new run-dir instead."""
    overrides = submit_overrides(PLAIN)
    assert overrides["resume"] is True
    submit = argv(PLAIN["services"][SUBMIT_SERVICE])
    assert "run-dir=/data/runs/${FEDQ_RUN:-fedq}" in submit
    assert overrides["run-dir"] == "/data/runs/fedq"


def test_compose_file_is_one_that_compose_v1_and_v2_both_accept():
    """Compose v1.29 (Debian's docker-compose) rejects a top-level `name:`; v2 accepts
    both. Where a Compose binary is installed, it validates the merged files itself."""
    for path in (COMPOSE, TLS_OVERRIDE):
        assert "name" not in yaml.safe_load(path.read_text()), path
    for compose in _compose_commands():
        for files in ([COMPOSE], [COMPOSE, TLS_OVERRIDE]):
            args = [a for f in files for a in ("-f", str(f))]
            done = subprocess.run([*compose, "-p", "fedq", *args, "config", "-q"],
                                  capture_output=True, text=True, timeout=120, check=False,
                                  cwd=ROOT)
            assert done.returncode == 0, f"{' '.join(compose)} config: {done.stderr}"


def _compose_commands() -> list[list[str]]:
    commands = []
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60,
            check=False).returncode == 0:
        commands.append(["docker", "compose"])
    return commands


def test_up_can_end_by_itself_when_the_run_ends():
    """No service restarts unconditionally (`always`/`unless-stopped` bring a stopped
    federation back with the daemon), submit runs once, and the documented command ends
    `up` with submit's exit status."""
    for name, service in PLAIN["services"].items():
        assert service.get("restart", "no") in ("no", "on-failure"), name
    assert PLAIN["services"][SUBMIT_SERVICE]["restart"] == "no"
    assert "docker compose up --build --exit-code-from submit" in COMPOSE.read_text()


def test_plain_superlink_port_is_published_on_loopback_only_unless_asked():
    """Without TLS the port serves Flower's Control API (it accepts runs to execute) with
    no authentication: by default only this host may reach it."""
    for mapping in PLAIN["services"][SUPERLINK_SERVICE]["ports"]:
        host, _, _ = interpolate(mapping).split(":")
        assert host == "127.0.0.1", mapping
        assert "FEDQ_PUBLISH_HOST" in mapping  # the explicit opt-in to every interface


def test_tls_override_secures_every_service_and_gives_each_node_its_own_key():
    superlink = argv(TLS["services"][SUPERLINK_SERVICE])
    assert "--insecure" not in superlink and "--enable-supernode-auth" in superlink
    mounted = {v.split(":")[1] for v in TLS["services"][SUPERLINK_SERVICE]["volumes"]}
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag_value(superlink, flag) in mounted
    keys = set()
    for name, service in supernode_services(TLS).items():
        args = argv(service)
        assert "--insecure" not in args, name
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert flag_value(args, "--root-certificates") in mounts, name
        key = flag_value(args, "--auth-supernode-private-key")
        assert key in mounts, name
        keys.add(key)
        assert node_config(service) == node_config(PLAIN["services"][name])
    assert len(keys) == len(supernode_services(TLS))
    submit = argv(TLS["services"][SUBMIT_SERVICE])
    assert "--insecure" not in submit and "--register-key" in submit


def test_tls_override_gives_submit_public_material_only_and_nobody_the_ca_key():
    """`submit` registers public keys and trusts the CA: a leaked submit container must
    not hold the CA key (it could mint server certificates) or any node's private key."""
    submit = TLS["services"][SUBMIT_SERVICE]
    sources = [v.split(":")[0] for v in submit["volumes"]]
    assert all(s.endswith((".pub", ".crt")) for s in sources), sources
    registered = flag_value(argv(submit), "--register-key")
    public = [v.split(":")[1] for v in submit["volumes"] if v.split(":")[0].endswith(".pub")]
    assert all(Path(target).parent == Path(registered) for target in public)
    assert len(public) == len(supernode_services(TLS)), "every node's key gets registered"
    for name, service in TLS["services"].items():
        for volume in service.get("volumes", []):
            source = Path(volume.split(":")[0])
            assert source.name != "ca.key", f"{name} mounts the CA key"
            if source.parent.name == "certs" and name.startswith("supernode"):
                assert source.name in ("ca.crt", name.replace("supernode", "node")), \
                    f"{name} mounts {source}, which is not its own key"


def test_dockerfile_installs_cpu_torch_and_runs_unprivileged():
    """Its defaults are what a user with internet access wants (python:3.11-slim, torch
    from PyTorch's CPU index); build arguments switch both for an offline build."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    source = re.search(r'^ARG PIP_SOURCE="([^"]*)"$', text, re.M)
    assert source and "--index-url https://download.pytorch.org/whl/cpu" in source.group(1)
    assert "RUN pip install ${PIP_SOURCE} torch==2.13.0+cpu" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "torch==2.13.0+cpu; sys_platform == 'linux'" in extras["torch"]  # what it resolves
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    for service in PLAIN["services"].values():  # every service uses the image it builds
        assert service["image"] == PLAIN["services"][SUPERLINK_SERVICE]["image"]


def test_offline_wheels_stay_out_of_the_final_image():
    """The wheel folder (~1 GB) is copied into the build stage only; the final stage takes
    the installed venv from it."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[[m.start() for m in re.finditer(r"^FROM ", text, re.M)][-1]:]
    assert "wheel" not in final.lower()
    assert "COPY --from=build /opt/fedq /opt/fedq" in final
    assert "wheelhouse" in (ROOT / ".gitignore").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # keep the build context small


# --- the edge client (fedq-client) --------------------------------------------------


@pytest.mark.parametrize(("args", "field"), [
    (["--env-id", "NoSuchEnv-v0"], "env-id"),
    (["--set", "learning-rte=0.1"], "learning-rte"),
    (["--set", "env-physics={\"lenght\": 0.3}"], "env-physics.lenght"),
    (["--set", "seed=-1"], "seed"),
])
def test_edge_client_refuses_bad_settings_before_connecting(tmp_path, capsys, args, field):
    with pytest.raises(SystemExit) as exited:
        client_main(["--server", "127.0.0.1:9", "--state-dir", str(tmp_path), "--insecure",
                     *args])
    assert exited.value.code == 2
    assert f"config field '{field}'" in capsys.readouterr().err
    assert not (tmp_path / "node-config.toml").exists()


def test_edge_client_needs_tls_or_an_explicit_insecure(tmp_path, capsys):
    with pytest.raises(SystemExit):
        client_main(["--server", "127.0.0.1:9", "--state-dir", str(tmp_path)])
    assert "--root-certificates" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs TLS"):
        supernode_command("h:1", tmp_path / "n.toml", root_certificates=None,
                          auth_key=tmp_path / "key", insecure=True, max_wait_time=None)


def test_edge_client_command_is_a_valid_supernode_command_with_a_stable_state_dir(
        tmp_path, capsys):
    certs = tmp_path / "certs"
    certs_main(["--out", str(certs), "--san", "fedq.example", "--nodes", "1"])
    capsys.readouterr()
    state_dir = tmp_path / "state"
    client_main(["--server", "fedq.example:9093", "--state-dir", str(state_dir),
                 "--env-id", "Acrobot-v1", "--set", "seed=5",
                 "--root-certificates", str(certs / "ca.crt"),
                 "--auth-key", str(certs / "node-1"), "--local-port", "9194",
                 "--print-command"])
    flwr_home, *command = capsys.readouterr().out.split()
    # what the printed line runs is what fedq-client itself would run: its FLWR_HOME too
    assert flwr_home == f"FLWR_HOME={state_dir.resolve() / 'flwr-home'}"
    assert Path(command[0]).name == "fedq-supernode"  # flower-supernode, prompt polling
    assert flag_value(command, "--port") == "9194"  # two devices on one host: two ports
    help_text = _help("fedq-supernode")
    assert all(flag in help_text for flag in _flags(command))
    assert "--insecure" not in command
    written = node_config({"command": ["--node-config",
                                       flag_value(command, "--node-config")]})
    assert written == {"env-id": "Acrobot-v1", "seed": 5,
                       "state-dir": str(state_dir.resolve())}
    context = Context(run_id=1, node_id=123, node_config=written, state=RecordDict(),
                      run_config=FedqConfig().to_mapping())
    # the device's state lives where the operator said, whatever node id Flower assigns
    assert device_from_context(context).state_dir == state_dir.resolve()


def test_cert_script_writes_a_ca_a_server_cert_with_the_sans_and_private_keys(tmp_path):
    certs_main(["--out", str(tmp_path), "--san", "superlink", "--san", "10.0.0.5",
                "--nodes", "2"])
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    for secret in ("ca.key", "server.key", "node-1", "node-2"):
        assert (tmp_path / secret).stat().st_mode & 0o077 == 0, secret
    assert (tmp_path / "node-2.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    certs_main(["--out", str(tmp_path), "--san", "other", "--node", "node-3"])
    reissued = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    reissued.verify_directly_issued_by(ca)  # the CA devices already trust is reused


# --- the run submitter (fedq-submit) -------------------------------------------------


def test_submitter_refuses_a_bad_run_config_before_contacting_the_superlink(tmp_path,
                                                                           capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exited:  # port 9: nothing listens, nothing is tried
        submit_main(["--superlink", "127.0.0.1:9", "--insecure",
                     "--set", "num-server-rounds=3", "--set", "learning-rte=0.1"])
    assert exited.value.code == 2
    assert "config field 'learning-rte'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        submit_main(["--superlink", "127.0.0.1:9"])  # neither TLS nor --insecure
    assert not (tmp_path / "config.toml").exists()


def test_submitter_adds_its_connection_and_keeps_the_users_others(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "10.1.2.3:9093"\n'
        'root-certificates = "/etc/lab-ca.crt"\n')
    write_connection(tmp_path, "127.0.0.1:9093", None)
    saved = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert saved["default"] == "lab"  # the user's default stays theirs
    assert saved["lab"] == {"address": "10.1.2.3:9093", "root-certificates": "/etc/lab-ca.crt"}
    assert saved["fedq"] == {"address": "127.0.0.1:9093", "insecure": True}
    fresh = tmp_path / "fresh"
    write_connection(fresh, "127.0.0.1:9093", None)
    assert tomllib.loads((fresh / "config.toml").read_text())["superlink"]["default"] == "fedq"


def test_submitter_names_an_unreachable_superlink_without_a_traceback(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        submit_main(["--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--wait", "1"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "fedq-submit: error: SuperLink 127.0.0.1:" in err
    assert "did not answer /health within 1 s" in err and "Traceback" not in err
