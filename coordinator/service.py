"""The coordinator service: Flower's SuperLink + SuperExec as child processes, and our run.

``Coordinator.start`` does, in order:

1. start the SuperLink (``flower-superlink`` behind :mod:`superlink_guard`) with its SQLite
   state in ``STATE/superlink.db``, TLS, and SuperNode authentication when an authorized-clients
   file is given; ``--isolation process``, so the ServerApp's launcher is ours to start;
2. wait until its Control API answers, stop runs a crash left unfinished (their ServerApp is
   gone; see :mod:`fleetfl.coordinator.state`), register the authorized SuperNode keys;
3. start ``flower-superexec`` (it launches the ServerApp process for each run) with
   ``FLEETFL_STATE_DIR`` set, so our ServerApp commits and resumes rounds in ``STATE/rounds``;
4. submit the run: a FAB of our ServerApp/ClientApp and the configuration.

Each child runs in its own session (a terminal's Ctrl-C reaches only us, and we stop them in
order: SuperExec and its ServerApp first, then the SuperLink) and gets ``PR_SET_PDEATHSIG``,
so a ``kill -9`` of the service does not leave them running. Their output goes to
``STATE/logs/``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fleetfl.coordinator.config import Config
from fleetfl.coordinator.control import (
    ControlClient,
    ControlError,
    RunInfo,
    build_fab,
    read_public_keys,
)
from fleetfl.coordinator.state import STATE_ENV
from fleetfl.tasks.registry import pythonpath_with_cwd

STARTUP_TIMEOUT_S = 180.0  # the SuperLink imports for ~10 s here, far longer on a Pi
STOP_GRACE_S = 15.0  # Flower's processes deregister and flush logs on SIGTERM
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TlsFiles:
    """The coordinator's certificate and key, and the CA that signed it (PEM files)."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ServiceSettings:
    """How to run the coordinator. ``tls=None`` means insecure (plain HTTP)."""

    host: str
    port: int
    state_dir: Path
    tls: TlsFiles | None
    authorized_clients: Path | None = None

    @property
    def local_address(self) -> str:
        """Where processes on this host reach the SuperLink (``0.0.0.0`` is not dialable)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"{host}:{self.port}"

    def path(self, *parts: str) -> Path:
        """A path inside the state directory."""
        return self.state_dir.joinpath(*parts)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the service dies (even by SIGKILL)."""
    # Not Linux: no prctl; the children's parent-pid monitors remain.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A child process in its own session, logging to a file, stopped as a process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def alive(self) -> bool:
        """Whether the process is still running (reaps it if not)."""
        return self.proc.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the whole group, SIGKILL it after ``grace_s``; the exit code."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may outlive its leader (e.g. a ServerApp still exiting).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its log."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def child_env(settings: ServiceSettings) -> dict[str, str]:
    """Environment of every child: this venv's commands, quiet Flower, our state directory."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # flwr-serverapp is found by name
    env["FLWR_HOME"] = str(settings.path("flwr"))
    env[STATE_ENV] = str(settings.state_dir)
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no phone-home from a deployment
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # and no PyPI lookups at every start
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"  # start the ServerApp within 0.2 s
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = pythonpath_with_cwd(env)  # the user's task module, if any
    return env


def superexec_secret(settings: ServiceSettings) -> Path:
    """A random secret shared by SuperLink and SuperExec so only ours can claim ServerApp tasks."""
    path = settings.path("superexec.secret")
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path


def superlink_argv(settings: ServiceSettings) -> list[str]:
    """The SuperLink command line (through the local-admin guard)."""
    argv = [sys.executable, "-m", "fleetfl.coordinator.superlink_guard",
            "--host", settings.host, "--port", str(settings.port),
            "--database", str(settings.path("superlink.db")),
            "--isolation", "process",
            "--superexec-auth-secret-file", str(superexec_secret(settings)),
            "--disable-runtime-dependency-installation"]  # fleetfl is installed; no `uv sync`
    if settings.tls is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-certfile", str(settings.tls.cert), "--ssl-keyfile", str(settings.tls.key),
                 "--ssl-ca-certfile", str(settings.tls.ca)]
    if settings.authorized_clients is not None:
        argv.append("--enable-supernode-auth")
    return argv


def superexec_argv(settings: ServiceSettings) -> list[str]:
    """The SuperExec command line: it claims ServerApp tasks and runs ``flwr-serverapp``."""
    argv = [str(Path(sys.executable).parent / "flower-superexec"),
            "--runtime-api-address", settings.local_address,
            "--superexec-auth-secret-file", str(superexec_secret(settings)),
            "--parent-pid", str(os.getpid())]
    if settings.tls is None:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(settings.tls.ca)]


# ServerApp log lines an operator must see on the console, not only in serverapp.log.
# Every warning and error of the ServerApp (a client's failure and its reason, a refused
# registration, a rejected update, waiting for devices) also goes to the coordinator's console.
ECHOED = ("WARNING", "ERROR", "FleetTooSmall")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Echo:
    """A text sink that writes to ``file`` and says the lines containing one of ``ECHOED``."""

    def __init__(self, file: IO[str], say: Callable[[str], None]) -> None:
        self._file, self._say = file, say

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if any(key in line for key in ECHOED):
                plain = _ANSI.sub("", line)  # Flower colours its level names
                # The line's level is its first of WARNING/ERROR (the text may hold the other).
                level = min(("WARNING", "ERROR"), key=lambda k: plain.find(k) % (len(plain) + 1))
                said = plain.split(level, 1)[-1].strip(" :")
                self._say(said.removeprefix("fleetfl:").strip())  # fleetfl.logs' format
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()


class LogSaver:
    """A thread appending a run's ServerApp log to ``STATE/logs/serverapp.log``.

    Flower keeps the ServerApp's log in the SuperLink (``flwr log``); a file next to the
    other logs survives the SuperLink and is where an operator looks first.
    """

    def __init__(self, settings: ServiceSettings, run_id: int,
                 say: Callable[[str], None] | None = None) -> None:
        self.settings, self.run_id, self._say = settings, run_id, say
        ca = settings.tls.ca if settings.tls else None
        # Made here, in the main thread: it sets FLWR_HOME and briefly captures stdout.
        self._client = ControlClient(settings.local_address, ca, settings.path("flwr"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serverapp-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        after = 0.0
        with open(self.settings.path("logs", "serverapp.log"), "a") as file:
            file.write(f"--- run {self.run_id} ---\n")
            out = _Echo(file, self._say) if self._say is not None else file
            while not self._stop.is_set():
                after = self._client.stream_logs(self.run_id, out, after)
                out.flush()  # a coordinator killed -9 keeps what it had logged
                try:
                    if self._client.run(self.run_id).finished:
                        break
                except ControlError:
                    pass  # SuperLink restarting or stopping: try again or get stopped
                self._stop.wait(1.0)
        self._client.close()

    def stop(self) -> None:
        """Stop following the log (the thread exits after its current request)."""
        self._stop.set()


class Coordinator:
    """Starts, watches and stops everything ``fleetfl coordinator start`` runs."""

    def __init__(self, settings: ServiceSettings, say: Callable[[str], None] = print) -> None:
        if settings.authorized_clients is not None and settings.tls is None:
            raise ValueError("--authorized-clients needs TLS: Flower authenticates SuperNodes "
                             "only over TLS (give --tls-cert/--tls-key/--tls-ca)")
        self.settings = settings
        self.say = say
        self.children: list[Child] = []
        self.control: ControlClient | None = None
        self.log_saver: LogSaver | None = None
        self._lock: IO[bytes] | None = None

    def _lock_state(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.settings.path("service.lock"), "ab")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RuntimeError(f"{self.settings.state_dir} is used by another running "
                               "`fleetfl coordinator start`") from None
        self._lock = fh

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, child_env(self.settings), self.settings.path("logs",
                                                                               f"{name}.log"))
        self.children.append(child)
        self._write_pids()
        return child

    def _write_pids(self) -> None:
        """``STATE/service.json``: our pid and the children's (each leads its process group)."""
        pids = {"service": os.getpid(), **{c.name: c.proc.pid for c in self.children}}
        self.settings.path("service.json").write_text(json.dumps(pids))

    def start(self, config: Config) -> int:
        """Start the SuperLink and SuperExec and submit ``config``; returns the run id."""
        self._lock_state()
        link = self._spawn("superlink", superlink_argv(self.settings))
        ca = self.settings.tls.ca if self.settings.tls else None
        self.control = ControlClient(self.settings.local_address, ca, self.settings.path("flwr"))
        self.control.wait_ready(STARTUP_TIMEOUT_S, alive=link.alive)
        stale = self.control.stop_unfinished_runs()
        if stale:
            self.say(f"stopped run(s) left unfinished by a previous coordinator: {stale}")
        if self.settings.authorized_clients is not None:
            added, removed = self.control.sync_nodes(read_public_keys(
                self.settings.authorized_clients))
            self.say(f"authorized clients: {len(added)} newly registered, "
                     f"{len(removed)} removed (keys no longer in "
                     f"{self.settings.authorized_clients})")
        self._spawn("superexec", superexec_argv(self.settings))
        run_id = self.control.start_run(build_fab(config))
        self.log_saver = LogSaver(self.settings, run_id, self.say)
        return run_id

    def status(self, run_id: int) -> RunInfo:
        """The run's status from the SuperLink."""
        assert self.control is not None, "start() first"
        return self.control.run(run_id)

    def check_children(self) -> str | None:
        """Name of a child that died unexpectedly, with its log tail (``None`` if all alive)."""
        for child in self.children:
            if not child.alive():
                return f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}"
        return None

    def stop(self) -> None:
        """Stop everything started, newest first (ServerApp launcher before the SuperLink)."""
        if self.log_saver is not None:
            self.log_saver.stop()
            self.log_saver = None
        if self.control is not None:
            self.control.close()
            self.control = None
        while self.children:
            self.children.pop().stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.settings.path("service.json").unlink(missing_ok=True)


def stop_requested() -> Callable[[], bool]:
    """Install SIGINT/SIGTERM handlers; the returned function tells whether one arrived."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: bool(received)


def wait_poll(seconds: float, stop: Callable[[], bool]) -> bool:
    """Sleep up to ``seconds`` in small steps; True if a stop was requested."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stop():
            return True
        time.sleep(0.1)
    return stop()
