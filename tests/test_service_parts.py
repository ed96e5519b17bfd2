"""The service's pieces without processes: keys, the admin-API guard, the FAB, the CLI checks."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import tomllib
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetfl.client import client_cmd
from fleetfl.coordinator import data_cmd, keys_cmd, service_cmd
from fleetfl.coordinator.config import load_config
from fleetfl.coordinator.control import (
    CLIENT_APP,
    SERVER_APP,
    ControlError,
    build_fab,
    read_public_keys,
)
from fleetfl.coordinator.service import ServiceSettings, TlsFiles, superlink_argv
from fleetfl.coordinator.superlink_guard import LocalAdminOnly, is_local


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for module in (keys_cmd, service_cmd, data_cmd, client_cmd):
        module.add_parser(sub)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    assert keys_cmd.run(_parse("keys", "init", "--out", str(out), "--host", "pi-coord.lan",
                               "--host", "10.0.0.5", "--clients", "2")) == 0
    return out


def test_keys_init_makes_a_ca_signed_server_cert_with_sans(keys: Path) -> None:
    ca = x509.load_pem_x509_certificate((keys / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((keys / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    ips = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    assert names == ["pi-coord.lan", "localhost"] and ips == ["10.0.0.5", "127.0.0.1"]
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert (keys / "server.key").stat().st_mode & 0o077 == 0  # secrets are not world-readable


def test_client_keys_are_what_flower_reads(keys: Path) -> None:
    private = serialization.load_ssh_private_key((keys / "clients" / "client-0").read_bytes(),
                                                 None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    authorized = read_public_keys(keys / "authorized_clients.txt")
    assert list(authorized.values()) == ["client-0", "client-1"]
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pem in authorized


def test_authorize_adds_a_key_once(keys: Path, tmp_path: Path) -> None:
    file = tmp_path / "auth.txt"
    for _ in range(2):
        keys_cmd.authorize(file, keys / "clients" / "client-1.pub")
    assert len(file.read_text().splitlines()) == 1


def test_authorized_clients_file_errors(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    file = tmp_path / "auth.txt"
    file.write_text("# a comment\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGT2 laptop\n")
    with pytest.raises(ControlError, match=r"auth.txt:3: not an OpenSSH public key"):
        read_public_keys(file)
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    file.write_text(ed.decode() + " laptop\n")
    with pytest.raises(ControlError, match=r"auth.txt:1: Flower needs an EC"):
        read_public_keys(file)


def _request(path: str, client: str, server: str = "0.0.0.0") -> int:
    statuses: list[int] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        statuses.append(200)

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "path": path, "client": (client, 5555), "server": (server, 9092)}
    asyncio.run(LocalAdminOnly(app)(scope, None, send))  # type: ignore[arg-type]
    return statuses[0]


@pytest.mark.parametrize(("path", "client", "status"), [
    ("/v1/fleet/pull-messages", "192.168.1.20", 200),  # devices reach the Fleet API
    ("/v1/control/start-run", "192.168.1.20", 403),  # but not the Control API
    ("/v1/control/register-node", "10.0.0.9", 403),
    ("/v1/runtime/pull-task-input", "192.168.1.20", 403),
    ("/v1/control/start-run", "127.0.0.1", 200),  # the service itself
    ("/v1/runtime/pull-task-input", "::1", 200),
    ("/health", "192.168.1.20", 200),
])
def test_guard_keeps_admin_apis_local(path: str, client: str, status: int) -> None:
    assert _request(path, client) == status


def test_guard_trusts_the_bind_address_itself() -> None:
    assert _request("/v1/control/list-runs", "10.0.0.5", server="10.0.0.5") == 200
    assert not is_local(None, ("10.0.0.5", 1)) and not is_local(("name", 1), None)


def test_fab_carries_our_apps_and_the_config() -> None:
    config = load_config(None, ["federation.rounds=7", "fleet.mix={rpi4=1}"])
    with zipfile.ZipFile(io.BytesIO(build_fab(config))) as fab:
        pyproject = tomllib.loads(fab.read("pyproject.toml").decode())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    assert app["config"]["federation"]["rounds"] == 7
    assert app["config"]["fleet"]["mix"] == '{"rpi4": 1.0}'


def test_superlink_command_has_state_tls_and_auth(tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem")
    argv = superlink_argv(ServiceSettings("0.0.0.0", 9092, tmp_path, tls, tmp_path / "auth"))
    joined = " ".join(argv)
    assert f"--database {tmp_path / 'superlink.db'}" in joined
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert f"--ssl-ca-certfile {tmp_path / 'ca.pem'}" in joined
    assert "--isolation process" in joined
    assert (tmp_path / "superexec.secret").stat().st_mode & 0o077 == 0
    insecure = superlink_argv(ServiceSettings("127.0.0.1", 9092, tmp_path, None))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


@pytest.mark.parametrize(("argv", "message"), [
    (["--insecure", "--tls-ca", "x"], "exclude each other"),
    ([], "give --tls-cert, --tls-key and --tls-ca"),
    (["--insecure", "--address", "nohost"], "expected HOST:PORT"),
])
def test_coordinator_start_option_errors(argv: list[str], message: str) -> None:
    args = _parse("coordinator", "start", *argv)
    with pytest.raises(ValueError, match=message):
        service_cmd.settings_from_args(args)


def test_auth_without_tls_is_refused(tmp_path: Path) -> None:
    from fleetfl.coordinator.service import Coordinator

    with pytest.raises(ValueError, match="needs TLS"):
        Coordinator(ServiceSettings("127.0.0.1", 1, tmp_path, None, tmp_path / "auth"))


def test_client_start_option_errors(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    args = _parse("client", "start", "--coordinator", "h:1", "--data", str(data))
    with pytest.raises(ValueError, match="--tls-ca FILE"):
        client_cmd.settings_from_args(args)
    args = _parse("client", "start", "--coordinator", "h:1", "--data", str(data), "--insecure",
                  "--auth-key", str(data))
    with pytest.raises(ValueError, match="needs TLS"):
        client_cmd.settings_from_args(args)


def test_data_split_writes_simulation_shards(tmp_path: Path) -> None:
    from fleetfl.tasks.data_format import load_npz
    from fleetfl.tasks.registry import load_federated

    assert data_cmd.run(_parse("data", "split", "--dataset", "digits", "--num-clients", "3",
                               "--out", str(tmp_path))) == 0
    fed = load_federated("digits", num_clients=3, seed=0)
    for i in range(3):
        shard = load_npz(tmp_path / f"client-{i}.npz")
        assert shard.x.shape == fed.clients[i][0].x.shape
        assert (shard.y == fed.clients[i][0].y).all()
    assert (tmp_path / "manifest.json").is_file()


def test_flowers_app_processes_import_user_tasks_from_where_fleetfl_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower starts the ServerApp and each ClientApp in processes of its own: both get the
    user's working directory first on PYTHONPATH, where a ``module:attribute`` task lives."""
    import os
    import subprocess
    import sys

    from fleetfl.client.daemon import ClientSettings, supernode_env
    from fleetfl.coordinator.service import child_env

    (tmp_path / "my_task.py").write_text("import fleetfl\nclass T(fleetfl.Task): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    client = ClientSettings("127.0.0.1:1", tmp_path / "d.npz", "rpi4", None, None, tmp_path)
    server = ServiceSettings("127.0.0.1", 1, tmp_path / "state", None)
    for env in (supernode_env(client), child_env(server)):
        assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/elsewhere"]
        probe = "from fleetfl.tasks.registry import resolve_task; print(resolve_task('my_task:T'))"
        done = subprocess.run([sys.executable, "-c", probe], cwd="/", env=env,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr


def test_the_console_echoes_the_serverapps_warnings_and_errors() -> None:
    from fleetfl.coordinator.service import _Echo

    said: list[str] = []
    sink = io.StringIO()
    echo = _Echo(sink, said.append)
    echo.write("\x1b[92mINFO \x1b[0m:      [ROUND 1/3]\n"
               "\x1b[93mWARNING \x1b[0m:   waiting for devices: 1 of 3 registered "
               "(federation.min_clients), 590 s left\n"
               "\x1b[93mWARNING \x1b[0m:   round 2: client 4 failed: ValueError: bad shard\n"
               "\x1b[91mERROR \x1b[0m:     ServerApp raised\n"
               "WARNING : fleetfl: round 3: client 1 sent no reply in time\n")
    assert said == ["waiting for devices: 1 of 3 registered (federation.min_clients), "
                    "590 s left", "round 2: client 4 failed: ValueError: bad shard",
                    "ServerApp raised", "round 3: client 1 sent no reply in time"]
    assert "[ROUND 1/3]" in sink.getvalue()  # the file keeps everything
