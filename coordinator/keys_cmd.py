"""``fleetfl keys``: a CA, the coordinator's TLS certificate and the SuperNodes' auth keys.

Flower does the TLS and the SuperNode authentication; this only makes the files it expects:

* ``ca.pem``/``ca.key``: a private certificate authority (EC P-384). Devices trust ``ca.pem``
  (``fleetfl client start --tls-ca``); ``ca.key`` never leaves the machine that made it.
* ``server.pem``/``server.key``: the coordinator's certificate, signed by the CA, with every
  name or IP a device dials as a subjectAltName (plus ``localhost``/``127.0.0.1``, which the
  coordinator's own ServerApp process dials).
* ``clients/NAME`` (OpenSSH EC P-384 private key, what ``flower-supernode
  --auth-supernode-private-key`` reads) and ``clients/NAME.pub`` (OpenSSH public key, what
  Flower registers). Each ``.pub`` line is appended to ``authorized_clients.txt``, the file
  ``fleetfl coordinator start --authorized-clients`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity clients (browsers, Apple) accept for a leaf cert
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Write ``data``; a secret file is created 0600 so it is never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # O_CREAT's mode does not apply to an existing file
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetfl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path, days: int = CA_DAYS) -> tuple[Path, Path]:
    """Create ``out/ca.pem`` and ``out/ca.key``; returns their paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fleetfl CA")).issuer_name(_name("fleetfl CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return (_write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM)),
            _write(out / "ca.key", _pem_key(key), secret=True))


def make_server_cert(ca_dir: Path, out: Path, hosts: list[str],
                     days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """Create ``out/server.pem``/``server.key`` signed by ``ca_dir``'s CA for ``hosts``."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / 'ca.key'} is not an EC private key")
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))  # ordered, no duplicates
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return (_write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
            _write(out / "server.key", _pem_key(key), secret=True))


def make_client_key(out: Path, name: str) -> tuple[Path, Path]:
    """Create a SuperNode auth key pair ``out/NAME`` (OpenSSH private) and ``out/NAME.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"client name {name!r}: use letters, digits, '-' or '_'")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(out / name, private, secret=True),
            _write(out / f"{name}.pub", public + f" {name}\n".encode()))


def authorize(authorized_file: Path, public_key_file: Path) -> None:
    """Append the public key in ``public_key_file`` to ``authorized_file`` (once)."""
    line = public_key_file.read_text().strip()
    existing = authorized_file.read_text().splitlines() if authorized_file.exists() else []
    key_part = " ".join(line.split()[:2])
    if any(" ".join(e.split()[:2]) == key_part for e in existing):
        return
    authorized_file.parent.mkdir(parents=True, exist_ok=True)
    with authorized_file.open("a") as fh:
        fh.write(line + "\n")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fleetfl keys {init,server,client}``."""
    keys = subparsers.add_parser(
        "keys", help="make the CA, the coordinator's TLS certificate and client auth keys",
        description="Make the files Flower's TLS and SuperNode authentication need. "
                    "See docs/deploy.md.")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="a new CA, a server certificate and N client keys")
    init.add_argument("--out", required=True, metavar="DIR", help="where to write everything")
    init.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                      help="a name or IP clients dial to reach the coordinator (repeatable); "
                           "localhost and 127.0.0.1 are always included")
    init.add_argument("--clients", type=int, default=0, metavar="N",
                      help="also make N client key pairs client-0 .. client-N-1")
    server = sub.add_parser("server", help="a new server certificate from an existing CA")
    server.add_argument("--ca-dir", required=True, metavar="DIR", help="holds ca.pem, ca.key")
    server.add_argument("--out", required=True, metavar="DIR")
    server.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP")
    client = sub.add_parser("client", help="a new client (SuperNode) auth key pair")
    client.add_argument("--name", required=True, help="file name of the key, e.g. rpi-kitchen")
    client.add_argument("--out", required=True, metavar="DIR")
    client.add_argument("--authorized-clients", metavar="FILE",
                        help="append the public key to this file (the coordinator's list)")
    return keys


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl keys ...``; prints the files written."""
    out = Path(args.out).expanduser()
    written: list[Path] = []
    if args.keys_command == "init":
        written += make_ca(out)
        written += make_server_cert(out, out, args.host)
        for i in range(args.clients):
            written += make_client_key(out / "clients", f"client-{i}")
            authorize(out / "authorized_clients.txt", written[-1])
        if args.clients:
            written.append(out / "authorized_clients.txt")
    elif args.keys_command == "server":
        written += make_server_cert(Path(args.ca_dir).expanduser(), out, args.host)
    else:
        written += make_client_key(out, args.name)
        if args.authorized_clients:
            authorize(Path(args.authorized_clients).expanduser(), written[-1])
            written.append(Path(args.authorized_clients))
    for path in written:
        print(path)
    return 0
