"""The device side of a deployment: one process running a Flower SuperNode and our ClientApp.

:func:`prepare` checks the local data file (and, given the task, its shapes and labels) and
resolves the device profile *once* (``auto`` runs the micro-benchmark here). Then
:func:`run_supernode` starts :mod:`fleetfl.client.supernode`: Flower's SuperNode in
``--isolation process`` mode with our persistent ClientApp runner in the same process
(:mod:`fleetfl.client.runner`), TLS, the SuperNode's auth key and a ``node_config`` that the
ClientApp reads (:mod:`fleetfl.client.local`): ``data-path``, ``device`` (a JSON file) and
optionally ``client-index``. This supervisor imports neither torch nor Flower. It restarts the
SuperNode when it exits (a device rides out coordinator restarts), says why it exited
(:func:`explain_exit`), and Ctrl-C/SIGTERM stop it.
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
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fleetfl.client.exits import explain_exit
from fleetfl.client.local import AUTO, load_checked, resolve_device, write_profile
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
    threads: int = 1  # torch/BLAS threads for local training
    poll_s: float = 0.5  # the SuperNode's idle poll of the coordinator
    task: str | None = None  # task.name, to check the data's shapes before connecting
    task_params: str = "{}"  # task.params as JSON
    runtime: str = "torch"  # the training runtime: torch, or executorch (a phone's)
    program: Path | None = None  # executorch: the .pte training program (default: export one)


@dataclass(frozen=True)
class Prepared:
    """Checked inputs: the data's size and the device profile file the ClientApp will read."""

    num_examples: int
    device_file: Path
    device_name: str


def prepare(settings: ClientSettings, probe_seconds: float = 1.0) -> Prepared:
    """Validate the data file and write the resolved device profile to the work directory.

    With ``settings.task``, the data must also fit the task (input shape, labels in range).
    """
    data = load_npz(settings.data)  # DataFormatError names the file and the array
    if settings.task is not None:
        check_data_fits(settings)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    device_file = settings.workdir / "device.json"
    if settings.device == AUTO:
        from fleetfl.devices.probe import probe

        profile = probe(probe_seconds)
    else:
        profile = resolve_device(settings.device)
    write_profile(device_file, profile)
    return Prepared(len(data), device_file, profile.name)


def check_data_fits(settings: ClientSettings) -> None:
    """Raise ``ValueError`` naming the file and array if the data does not fit the task."""
    import json

    from fleetfl.tasks.registry import resolve_task

    try:
        task = resolve_task(str(settings.task), json.loads(settings.task_params))
    except (ImportError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"--task {settings.task}: {err}") from None
    load_checked(task, str(settings.data))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the SuperNode's local Runtime API)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config(settings: ClientSettings, prepared: Prepared) -> str:
    """The ``--node-config`` string (TOML values; Flower splits pairs on spaces)."""
    for path in (settings.data, prepared.device_file, settings.program or ""):
        if '"' in str(path) or "\\" in str(path):
            raise ValueError(f"{path}: paths with quotes or backslashes cannot be passed to Flower")
    pairs = [f'data-path="{settings.data.resolve()}"', f'device="{prepared.device_file}"']
    if settings.index is not None:
        pairs.append(f"client-index={settings.index}")
    if settings.runtime != "torch":
        pairs.append(f'runtime="{settings.runtime}"')
    if settings.program is not None:
        pairs.append(f'program="{settings.program}"')
    return " ".join(pairs)


def supernode_argv(settings: ClientSettings, prepared: Prepared, port: int,
                   retries: int | None = None) -> list[str]:
    """The ``flower-supernode`` command line (through :mod:`fleetfl.client.supernode`)."""
    argv = [sys.executable, "-m", "fleetfl.client.supernode",
            "--state-dir", str(settings.workdir / "state"), "--poll-s", str(settings.poll_s),
            "--superlink", settings.coordinator, "--isolation", "process",
            "--node-config", node_config(settings, prepared),
            "--port", str(port)]
    argv += ["--insecure"] if settings.tls_ca is None else ["--root-certificates",
                                                            str(settings.tls_ca)]
    if settings.auth_key is not None:
        argv += ["--auth-supernode-private-key", str(settings.auth_key)]
    if retries is not None:  # else Flower's SuperNode retries its connection forever
        argv += ["--max-retries", str(retries)]
    return argv


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def supernode_env(settings: ClientSettings) -> dict[str, str]:
    """Environment of the SuperNode process (which also runs the ClientApp)."""
    env = dict(os.environ)
    # torch and BLAS size their thread pools from these at import: several devices sharing a
    # host (or a test) with one pool each per core oversubscribe it badly (37 s instead of
    # 0.25 s per local round was measured with 3 devices on 2 cores).
    for var in THREAD_VARS:
        env[var] = str(settings.threads)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(settings.workdir / "flwr")  # where Flower unpacks the run's FAB
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no phone-home from devices (metered links, privacy)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = pythonpath_with_cwd(env)  # the user's task module, if any
    return env


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this daemon dies, even by SIGKILL."""
    # Not Linux: no prctl; Flower's parent-pid monitors remain.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Tail:
    """The last ``lines`` lines of the SuperNode's output, which it also passes on to ``out``."""

    def __init__(self, out: IO[bytes], lines: int = 60) -> None:
        self.out, self.lines = out, deque[str](maxlen=lines)

    def follow(self, stream: IO[bytes]) -> threading.Thread:
        """Copy ``stream`` to ``out`` on a thread, keeping its tail."""
        def copy() -> None:
            for raw in stream:
                self.out.write(raw)
                self.out.flush()
                self.lines.append(raw.decode(errors="replace"))
        thread = threading.Thread(target=copy, daemon=True, name="fleetfl-supernode-output")
        thread.start()
        return thread


class _TextAsBinary:
    """A binary sink over a text stream without ``.buffer`` (a notebook's stdout)."""

    def __init__(self, text: IO[str]) -> None:
        self.text = text

    def write(self, data: bytes) -> int:
        return self.text.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self.text.flush()


def _binary_stdout() -> IO[bytes]:
    buffer = getattr(sys.stdout, "buffer", None)
    return buffer if buffer is not None else _TextAsBinary(sys.stdout)  # type: ignore[return-value]


def start_supernode(settings: ClientSettings, prepared: Prepared, out: IO[bytes],
                    retries: int | None = None) -> tuple[subprocess.Popen[bytes], Tail]:
    """Start the SuperNode, its output copied to ``out`` (and its tail kept, to explain an exit).

    It stays in our process group, so killing the group (a supervisor, a test, Ctrl-C in a
    terminal) reaches it.
    """
    port = settings.runtime_port or free_port()
    proc = subprocess.Popen(supernode_argv(settings, prepared, port, retries),
                            env=supernode_env(settings), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    tail = Tail(out)
    tail.follow(proc.stdout)  # type: ignore[arg-type]
    return proc, tail


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
            proc, tail = start_supernode(settings, prepared, _binary_stdout(), retries)
            try:
                _wait(proc, stopping)
            finally:
                code = stop(proc) if proc.poll() is None else proc.returncode
            if stopping:
                break
            # A SuperNode that served for a while and then failed starts the count afresh.
            failures = 1 if time.monotonic() - started > RETRY_MAX_S else failures + 1
            why = explain_exit(code, list(tail.lines), settings.coordinator,
                               str(settings.tls_ca or ""))
            if retries is not None and failures > retries:
                say(f"fleetfl: {why}; giving up after {failures} failed attempt(s) "
                    f"(--retries {retries})")
                return int(code or 1)
            pause = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
            say(f"fleetfl: {why}; trying again in {pause:.0f} s")
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
                 index: int | None = None, retries: int | None = None,
                 task: str | None = None, task_params: str = "{}", threads: int = 1,
                 poll: float = 0.5) -> int:
    """Run this device as a fleetfl client, exactly as ``fleetfl client start`` does.

    Checks ``data`` and resolves the device profile first (a bad file raises
    ``ValueError`` before anything connects), then runs a Flower SuperNode against
    ``coordinator`` (``HOST:PORT``) until it stops; returns its exit status. The arguments are
    the command's flags (``--tls-ca``, ``--auth-key``, ``--insecure``, ``--device``,
    ``--workdir``, ``--index``, ``--retries``, ``--task``, ``--task-params``, ``--threads``,
    ``--poll``). The run's ``task.name`` must be importable here.
    """
    from fleetfl.client.client_cmd import settings_from_args

    args = argparse.Namespace(
        coordinator=coordinator, data=str(data), device=device, insecure=insecure,
        tls_ca=None if tls_ca is None else str(tls_ca),
        auth_key=None if auth_key is None else str(auth_key),
        workdir=None if workdir is None else str(workdir), index=index, retries=retries,
        runtime_port=0, task=task, task_params=task_params, threads=threads, poll=poll)
    settings = settings_from_args(args)
    return run_supernode(settings, prepare(settings), retries=retries)
