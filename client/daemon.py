"""The device side of a deployment: a Flower SuperNode running our ClientApp.

:func:`prepare` checks the local data file and resolves the device profile *once* (``auto``
runs the micro-benchmark here, not in every ClientApp process), then :func:`run_supernode`
starts ``flower-supernode`` with TLS, the SuperNode's auth key and a ``node_config`` that the
ClientApp reads (:mod:`fleetfl.client.local`): ``data-path``, ``device`` (a JSON file) and
optionally ``client-index``. The SuperNode retries the coordinator forever, so a device rides
out coordinator restarts. Ctrl-C/SIGTERM stop the SuperNode and its ClientApp processes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetfl.client.local import AUTO, resolve_device, write_profile
from fleetfl.tasks.data_format import load_npz
from fleetfl.tasks.registry import pythonpath_with_cwd

STOP_GRACE_S = 15.0
RETRY_FIRST_S = 5.0  # pause after the first failed SuperNode start; doubles each time
RETRY_MAX_S = 300.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ClientSettings:
    """What ``fleetfl client start`` was told. ``tls_ca=None`` means insecure."""

    coordinator: str  # HOST:PORT of the SuperLink
    data: Path
    device: str  # catalog name, JSON file, or "auto"
    tls_ca: Path | None
    auth_key: Path | None
    workdir: Path
    index: int | None = None
    runtime_port: int = 0  # 0: pick a free port (several clients can share a host)


@dataclass(frozen=True)
class Prepared:
    """Checked inputs: the data's size and the device profile file the ClientApp will read."""

    num_examples: int
    device_file: Path
    device_name: str


def prepare(settings: ClientSettings, probe_seconds: float = 1.0) -> Prepared:
    """Validate the data file and write the resolved device profile to the work directory."""
    data = load_npz(settings.data)  # DataFormatError names the file and the array
    settings.workdir.mkdir(parents=True, exist_ok=True)
    device_file = settings.workdir / "device.json"
    if settings.device == AUTO:
        from fleetfl.devices.probe import probe

        profile = probe(probe_seconds)
    else:
        profile = resolve_device(settings.device)
    write_profile(device_file, profile)
    return Prepared(len(data), device_file, profile.name)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the SuperNode's local Runtime API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config(settings: ClientSettings, prepared: Prepared) -> str:
    """The ``--node-config`` string (TOML values; Flower splits pairs on spaces)."""
    for path in (settings.data, prepared.device_file):
        if '"' in str(path) or "\\" in str(path):
            raise ValueError(f"{path}: paths with quotes or backslashes cannot be passed to Flower")
    pairs = [f'data-path="{settings.data.resolve()}"', f'device="{prepared.device_file}"']
    if settings.index is not None:
        pairs.append(f"client-index={settings.index}")
    return " ".join(pairs)


def supernode_argv(settings: ClientSettings, prepared: Prepared, port: int) -> list[str]:
    """The ``flower-supernode`` command line (through :mod:`fleetfl.client.supernode`)."""
    argv = [sys.executable, "-m", "fleetfl.client.supernode",
            "--superlink", settings.coordinator,
            "--node-config", node_config(settings, prepared),
            "--port", str(port)]
    argv += ["--insecure"] if settings.tls_ca is None else ["--root-certificates",
                                                            str(settings.tls_ca)]
    if settings.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(settings.auth_key)]
    return argv


def supernode_env(settings: ClientSettings) -> dict[str, str]:
    """Environment of the SuperNode and the ClientApp processes it starts."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(settings.workdir / "flwr")  # where Flower unpacks the run's FAB
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no phone-home from devices (metered links, privacy)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # A message waits for its ClientApp process at most this long (Flower's default: 1 s).
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = pythonpath_with_cwd(env)  # the user's task module, if any
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this daemon dies, even by SIGKILL."""
    # Not Linux: no prctl; Flower's parent-pid monitors remain.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start_supernode(settings: ClientSettings, prepared: Prepared,
                    log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the SuperNode (its output to ``log``, else ours).

    It stays in our process group, so killing the group (a supervisor, a test, Ctrl-C in a
    terminal) reaches it; Flower's own processes under it follow their parent's exit.
    """
    port = settings.runtime_port or free_port()
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(supernode_argv(settings, prepared, port),
                                env=supernode_env(settings), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_die_with_parent)
    finally:
        if out is not None:
            out.close()


def stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the SuperNode (it deregisters and exits), SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def _wait(proc: subprocess.Popen[bytes], stopping: list[int]) -> None:
    """Wait for ``proc`` to exit or for a stop request, in small steps."""
    while proc.poll() is None and not stopping:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)


def run_supernode(settings: ClientSettings, prepared: Prepared, retries: int | None = None,
                  say: Callable[[str], None] = print) -> int:
    """Run the SuperNode in the foreground until we get SIGINT/SIGTERM.

    A SuperNode exits when the coordinator refuses it (its key is not registered, or not yet:
    a coordinator registers keys just after it starts) or when its connection setup fails
    otherwise. The device then tries again after a growing pause (5 s .. 5 min); ``retries``
    limits the consecutive failed attempts (``None``: keep trying, as a device should).
    """
    stopping: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    failures, code = 0, 0
    try:
        while not stopping:
            started = time.monotonic()
            proc = start_supernode(settings, prepared)
            try:
                _wait(proc, stopping)
            finally:
                code = stop(proc) if proc.poll() is None else proc.returncode
            if stopping:
                break
            # A SuperNode that served for a while and then failed starts the count afresh.
            failures = 1 if time.monotonic() - started > RETRY_MAX_S else failures + 1
            if retries is not None and failures > retries:
                say(f"fleetfl: the SuperNode failed {failures} time(s) in a row (exit code "
                    f"{code}); giving up")
                return int(code or 1)
            pause = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
            say(f"fleetfl: the SuperNode exited (code {code}): the coordinator refused this "
                f"device (is its key authorized?) or is restarting; trying again in "
                f"{pause:.0f} s")
            deadline = time.monotonic() + pause
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
    return 130 if stopping else int(code or 0)


def start_client(coordinator: str, data: str | os.PathLike[str], *,
                 tls_ca: str | os.PathLike[str] | None = None,
                 auth_key: str | os.PathLike[str] | None = None, insecure: bool = False,
                 device: str = AUTO, workdir: str | os.PathLike[str] | None = None,
                 index: int | None = None, retries: int | None = None) -> int:
    """Run this device as a fleetfl client, exactly as ``fleetfl client start`` does.

    Checks ``data`` and resolves the device profile first (a bad file raises
    ``ValueError`` before anything connects), then runs a Flower SuperNode against
    ``coordinator`` (``HOST:PORT``) until it stops; returns its exit status. The arguments are
    the command's flags (``--tls-ca``, ``--auth-key``, ``--insecure``, ``--device``,
    ``--workdir``, ``--index``, ``--retries``). The run's ``task.name`` must be importable here.
    """
    from fleetfl.client.client_cmd import DEFAULT_WORKDIR, settings_from_args

    args = argparse.Namespace(
        coordinator=coordinator, data=str(data), device=device, insecure=insecure,
        tls_ca=None if tls_ca is None else str(tls_ca),
        auth_key=None if auth_key is None else str(auth_key),
        workdir=str(DEFAULT_WORKDIR if workdir is None else workdir), index=index,
        runtime_port=0)
    settings = settings_from_args(args)
    return run_supernode(settings, prepare(settings), retries=retries)
