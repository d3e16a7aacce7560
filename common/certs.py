"""Self-signed TLS identity for a SuperLink and authentication keys for SuperNodes.

Flower 1.42 encrypts SuperNode <-> SuperLink traffic with TLS when the SuperLink gets
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and each SuperNode trusts the CA with
``--root-certificates``; the server certificate must name the address the nodes dial
(a compose service name, a LAN IP, a DNS name). SuperNode authentication
(``--enable-supernode-auth``, TLS required) admits only nodes whose ECDSA public key was
registered with ``flwr supernode register``; each node signs with its private key
(``--auth-supernode-private-key``).

For local use and small fleets, ``fedq-certs`` writes all of it into one directory::

    fedq-certs --out runs/compose/certs --san superlink --san 127.0.0.1 --nodes 3

    ca.crt / ca.key                 the CA (ca.key stays with the operator; reused if present)
    server.pem / server.key         the SuperLink's certificate and key
    node-1 / node-1.pub, ...        each SuperNode's auth key pair (OpenSSH format)

Keys are written mode 0600. A real deployment should use certificates from the
organisation's own CA; the flags stay the same.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a SuperLink's TLS identity, passed through to Flower as paths.

    ``ca_cert`` verifies ``server_cert``; SuperNodes and the CLI trust it via
    ``--root-certificates`` / ``root-certificates``.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, sans: Sequence[str] = DEFAULT_SANS,
                   days: int = 365) -> TLSFiles:
    """Write a CA (or reuse the one in ``directory``) and a SuperLink certificate whose
    subject alternative names are ``sans`` (IP addresses or DNS names)."""
    if not sans:
        raise ValueError("the server certificate needs at least one SAN (host name or IP)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_make_ca(directory, days)
    now = datetime.datetime.now(datetime.UTC)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TLSFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.server_key, _pem_private(server_key))
    return files


def make_supernode_auth_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format; return (private, public) paths.

    The public key is registered at the SuperLink (``flwr supernode register``), the
    private one stays on the device (``--auth-supernode-private-key``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def write_private(path: Path, content: bytes) -> None:
    """Write a secret readable by its owner only (created 0600 before any byte lands)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(content)


def _load_or_make_ca(directory: Path,
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Reuse ``ca.key``/``ca.crt`` so devices that already trust the CA keep working
    when the server certificate is reissued (new SANs) or node keys are added."""
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedq self-signed CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _pem_private(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def main(argv: Sequence[str] | None = None) -> None:
    """``fedq-certs``: write the CA, the SuperLink certificate and node key pairs."""
    parser = argparse.ArgumentParser(
        prog="fedq-certs", description="Write a self-signed CA, a SuperLink TLS certificate "
        "and SuperNode authentication key pairs (for local use and small fleets).")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--san", action="append", default=[],
                        help="host name or IP the SuperNodes dial (repeatable; default "
                        "localhost and 127.0.0.1); e.g. --san superlink for docker compose")
    parser.add_argument("--nodes", type=int, default=0,
                        help="write auth key pairs node-1 .. node-N")
    parser.add_argument("--node", action="append", default=[],
                        help="write an auth key pair with this name (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="certificate lifetime")
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 1:
        parser.error("--nodes must be >= 0 and --days >= 1")
    files = make_tls_files(args.out, args.san or DEFAULT_SANS, args.days)
    print(f"CA:                 {files.ca_cert}  (copy to every SuperNode)")
    print(f"SuperLink cert/key: {files.server_cert}, {files.server_key}  "
          f"(SANs: {', '.join(args.san or DEFAULT_SANS)})")
    for name in [f"node-{i}" for i in range(1, args.nodes + 1)] + args.node:
        private, public = make_supernode_auth_keys(args.out, name)
        print(f"node key pair:      {private} (device), {public} (register at the SuperLink)")


if __name__ == "__main__":
    main()
