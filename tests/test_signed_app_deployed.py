"""A device that requires signed apps (``fedq-client --trusted-entities``) runs a validly
signed app bundle and refuses the same bundle tampered with after signing.

Flower 1.42 delivers FAB signatures only with Hub apps: ``flwr run @publisher/app==x.y.z``
makes the SuperLink POST to ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab``, which answers a
download URL and the bundle's signatures (``public_key_id``, ``signature``, ``signed_at``:
Ed25519 over the 8-byte big-endian ``signed_at`` followed by sha256 of the FAB;
``_get_remote_fab`` in flwr/superlink/servicer/control/control_handlers.py), and the
SuperNode checks them against its trusted entities before any app code runs
(``_verify_fab`` in flwr/supernode/start_client_internal.py). A minimal stand-in for the
Hub on 127.0.0.1 serves fedq's own FAB, signed by the key the device trusts, as version
1.0.0, and as 1.0.1 the same bundle with one module changed after signing (the original
signature kept, as a man in the middle would have to). Real flower-superlink and
flower-supernode processes (the command line fedq-client execs into) run both.
"""

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

from fedq.client.edge import device_node_config, supernode_command, write_node_config
from fedq.simulations.compose_topology import TINY_RUN
from fedq.simulations.flower_runtime import (
    SuperNode,
    deployment_superlink,
    free_port,
    submit_run,
)
from fedq.simulations.run import APP_DIR

pytestmark = pytest.mark.slow

KEY_ID = "fpk_fedq_release"


def _signature(key: Ed25519PrivateKey, fab: bytes) -> dict[str, object]:
    signed_at = int(time.time())
    signed = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return {"public_key_id": KEY_ID, "signed_at": signed_at,
            "signature": base64.urlsafe_b64encode(signed).rstrip(b"=").decode()}


class StandInHub(ThreadingHTTPServer):
    """``POST /v1/hub/fetch-fab`` -> download URL + signatures; ``GET /fab/<version>``."""

    def __init__(self, releases: dict[str, tuple[bytes, list[dict[str, object]]]]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.releases = releases
        self.fetched: list[str] = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v1"


class _HubHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        version = str(body["app_version"])
        self.server.fetched.append(version)
        _, verifications = self.server.releases[version]
        self._send(json.dumps({
            "fab_url": f"http://127.0.0.1:{self.server.server_port}/fab/{version}",
            "verifications": verifications}).encode(), "application/json")

    def do_GET(self) -> None:
        fab, _ = self.server.releases[self.path.rsplit("/", 1)[-1]]
        self._send(fab, "application/octet-stream")

    def _send(self, payload: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:  # quiet
        pass


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_signed_app_runs_and_a_tampered_one_is_refused(tmp_path, monkeypatch):
    key = Ed25519PrivateKey.generate()
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text(f"{KEY_ID}: '%s'\n" % key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode())
    files = collect_files(APP_DIR.resolve())
    fab, _ = build_fab_from_files(files)
    module = "client/client_app.py"  # in the bundle, and run on the device
    tampered, _ = build_fab_from_files(
        {**files, module: files[module].read_bytes() + b"\nTAMPERED = True\n"})
    assert tampered != fab
    signature = _signature(key, fab)
    hub = StandInHub({"1.0.0": (fab, [signature]), "1.0.1": (tampered, [signature])})
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    monkeypatch.setenv("FLWR_SUPERGRID_API_URL", hub.api_url)  # the SuperLink's Hub
    state = tmp_path / "state"
    node_config = write_node_config(state, device_node_config(None, [], state))
    run_config = {**TINY_RUN, "num-server-rounds": 1, "round-timeout": 60,
                  "backend": "numpy"}
    try:
        with deployment_superlink(tmp_path / "link") as link:
            tail = supernode_command(link.address, node_config, root_certificates=None,
                                     auth_key=None, insecure=True, max_wait_time=None,
                                     local_port=free_port(), trusted_entities=trusted)[1:]
            (tmp_path / "node").mkdir()
            node = SuperNode(link, "signed-only", tmp_path / "node", tail,
                             {**link._env, "FLWR_HOME": str(state / "flwr-home")})
            node.start()
            try:
                node.wait_registered(120)
                signed = submit_run(link, "@fedq/fedq==1.0.0", stream=False, timeout=300,
                                    log_path=tmp_path / "signed.log", run_config={
                                        **run_config, "run-dir": str(tmp_path / "signed")})
                forged = submit_run(link, "@fedq/fedq==1.0.1", stream=False, timeout=300,
                                    log_path=tmp_path / "forged.log", run_config={
                                        **run_config, "run-dir": str(tmp_path / "forged")})
            finally:
                node.stop()
    finally:
        hub.shutdown()
    assert hub.fetched == ["1.0.0", "1.0.1"]  # both came from the stand-in Hub
    assert signed.ok, signed.output[-3000:]
    (row,) = _rows(tmp_path / "signed" / "metrics.jsonl")
    assert row["train"]["clients"] == 1 and row["device-failures"] == []
    assert not forged.ok and forged.status == "finished:failed", forged.output[-3000:]
    (row,) = _rows(tmp_path / "forged" / "metrics.jsonl")
    assert row["train"]["clients"] == 0
    (train,) = [r for r in _rows(tmp_path / "forged" / "clients.jsonl")
                if r["phase"] == "train"]
    assert "could not be verified" in train["error"]
    log = node.log_path.read_text()  # the signatures arrived; the tampered FAB fails them
    assert "the provided trusted entities could not verify the FAB" in log
    assert "not supported by the connected SuperLink" not in log
