"""``fleetfl coordinator start``: run the coordinator as a service until its run finishes.

Starts Flower's SuperLink (SQLite state, TLS, SuperNode authentication) and our ServerApp
(:mod:`fleetfl.coordinator.service`), prints how devices connect, prints each round as it is
committed, and stops everything it started on Ctrl-C/SIGTERM or when the run ends. Restarted
with the same ``--state`` after a crash, the run resumes after the last committed round.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from fleetfl.coordinator.config import Config, ConfigError, load_config
from fleetfl.coordinator.service import (
    Coordinator,
    ServiceSettings,
    TlsFiles,
    stop_requested,
    wait_poll,
)
from fleetfl.coordinator.state import read_metrics

DEFAULT_ADDRESS = "0.0.0.0:9092"
POLL_S = 1.0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fleetfl coordinator start``."""
    coord = subparsers.add_parser("coordinator", help="run the coordinator as a service",
                                  description="Run the coordinator for real devices.")
    sub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    start = sub.add_parser(
        "start", help="start Flower's SuperLink and our ServerApp; run until the run ends",
        description="Start Flower's SuperLink (SQLite state, TLS, SuperNode authentication) "
                    "and fleetfl's ServerApp; print rounds as they finish. Ctrl-C stops "
                    "everything; restarting with the same --state resumes after the last "
                    "finished round. See docs/deploy.md.")
    start.add_argument("--config", metavar="FILE.toml", help="run configuration (TOML)")
    start.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    start.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                       help=f"where devices connect (default {DEFAULT_ADDRESS}); one port "
                            "serves Flower's Fleet, Control and Runtime APIs")
    start.add_argument("--state", default="fleetfl-state", metavar="DIR",
                       help="SuperLink database, committed rounds, logs (default ./fleetfl-state)")
    start.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    start.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    start.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signed it (PEM)")
    start.add_argument("--insecure", action="store_true",
                       help="plain HTTP, no TLS (trusted networks and tests only)")
    start.add_argument("--authorized-clients", metavar="FILE",
                       help="OpenSSH public keys of the SuperNodes allowed to join, one per line "
                            "(enables Flower's SuperNode authentication; needs TLS)")
    return coord


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address {address!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """Validate the TLS/auth options into :class:`ServiceSettings` (ValueError if invalid)."""
    host, port = parse_address(args.address)
    files = [args.tls_cert, args.tls_key, args.tls_ca]
    if args.insecure and any(files):
        raise ValueError("--insecure and --tls-* exclude each other")
    if not args.insecure and not all(files):
        raise ValueError("give --tls-cert, --tls-key and --tls-ca (make them with "
                         "`fleetfl keys init`), or --insecure")
    tls = None
    if not args.insecure:
        paths = [Path(f).expanduser().resolve() for f in files]
        for flag, path in zip(("--tls-cert", "--tls-key", "--tls-ca"), paths, strict=True):
            if not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
        tls = TlsFiles(*paths)
    authorized = None
    if args.authorized_clients:
        authorized = Path(args.authorized_clients).expanduser().resolve()
        if not authorized.is_file():
            raise ValueError(f"--authorized-clients {authorized}: no such file")
    return ServiceSettings(host, port, Path(args.state).expanduser().resolve(), tls, authorized)


def _dial_names(settings: ServiceSettings) -> list[str]:
    """Names devices can dial: the bind host, else the certificate's non-loopback names."""
    if settings.host not in ("0.0.0.0", "::"):
        return [settings.host]
    names: list[str] = []
    if settings.tls is not None:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(settings.tls.cert.read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
    names = [n for n in names if n != "localhost" and not _is_loopback(n)]
    return names or ["THIS-HOST"]


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def connect_help(settings: ServiceSettings) -> str:
    """The lines telling a device owner how to join."""
    host = _dial_names(settings)[0]
    where = f"[{host}]" if ":" in host else host
    cmd = f"fleetfl client start --coordinator {where}:{settings.port} --data SHARD.npz"
    if settings.tls is None:
        cmd += " --insecure"
    else:
        cmd += f" --tls-ca {settings.tls.ca.name}"
    if settings.authorized_clients is not None:
        cmd += " --auth-key CLIENT_PRIVATE_KEY"
    return f"devices connect with:\n  {cmd} --device auto"


def format_row(row: dict[str, Any], rounds: int) -> str:
    """One committed round as a log line."""
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    return (f"round {row.get('round')}/{rounds}: accuracy {num('accuracy', '.4f')} "
            f"loss {num('loss', '.4f')} | clients {row.get('aggregated', '-')}/"
            f"{row.get('selected', '-')} aggregated, {row.get('failed', 0)} failed | "
            f"uplink {num('uplink_bytes', ',')} B | wall {num('wall_time_s', '.1f')} s")


def serve(settings: ServiceSettings, config: Config) -> int:
    """Run the service until the run finishes (0), fails (1) or we are stopped (130)."""
    stop = stop_requested()
    coordinator = Coordinator(settings, say=lambda text: print(f"fleetfl: {text}", flush=True))
    rounds_dir = settings.path("rounds")
    printed = len(read_metrics(rounds_dir))
    try:
        if printed:
            print(f"fleetfl: resuming after round {printed} from {rounds_dir}", flush=True)
        run_id = coordinator.start(config)
        url = f"{'https' if settings.tls else 'http'}://{settings.host}:{settings.port}"
        warning = "" if settings.tls else " (INSECURE: no TLS, no authentication)"
        print(f"fleetfl: coordinator up on {url}{warning}, run {run_id}; logs in "
              f"{settings.path('logs')}\nfleetfl: {connect_help(settings)}", flush=True)
        while True:
            if wait_poll(POLL_S, stop):
                print("fleetfl: stopping (interrupted)", flush=True)
                return 130
            rows = read_metrics(rounds_dir)
            for row in rows[printed:]:
                print(f"fleetfl: {format_row(row, config.federation.rounds)}", flush=True)
            printed = max(printed, len(rows))
            dead = coordinator.check_children()
            if dead:
                print(f"fleetfl: error: {dead}", file=sys.stderr, flush=True)
                return 1
            info = coordinator.status(run_id)
            if info.finished:
                ok = info.status.endswith("completed")
                print(f"fleetfl: run {run_id} {info.status}"
                      + ("" if ok else f": {info.details} (ServerApp log: FLWR_HOME="
                         f"{settings.path('flwr')} flwr log {run_id} fleetfl --show)"), flush=True)
                return 0 if ok else 1
    finally:
        coordinator.stop()


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl coordinator start``."""
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 2
    config = load_config(args.config, args.overrides)  # ConfigError is reported by the CLI
    preflight_in_child(config)  # before the SuperLink starts; torch stays out of this process
    try:
        return serve(settings, config)
    except (RuntimeError, ValueError) as err:
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 1


def preflight_in_child(config: Config, *, timeout_s: float = 600.0) -> None:
    """``fleetfl.coordinator.preflight.preflight`` (deployed) in a child process, so that the
    calling process (the coordinator's long-lived supervisor) never loads torch and the model
    (``preflight.py`` imports torch): ~220 MB it would otherwise hold for the whole run. A
    failed check raises the child's ``ConfigError`` (same key, same message); a crash raises
    ``RuntimeError`` with its stderr."""
    import json
    import subprocess
    import sys

    from fleetfl.coordinator.config import to_run_config

    done = subprocess.run([sys.executable, "-m", "fleetfl.coordinator.preflight"],
                          input=json.dumps(to_run_config(config)), capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if done.returncode == 0:
        return
    lines = done.stdout.strip().splitlines()
    if done.returncode == 2 and lines:
        error = json.loads(lines[-1])
        raise ConfigError(error["key"], error["problem"])
    raise RuntimeError(f"the start-up checks crashed (exit {done.returncode}): "
                       f"{done.stderr.strip()[-2000:]}")
