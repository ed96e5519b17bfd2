"""Talk to our SuperLink's Control API: register SuperNode keys, submit and watch the run.

Everything goes through Flower's own Control API client (what the ``flwr`` CLI uses), so the
service needs no ``flwr`` subprocesses. The run is submitted as a FAB built in memory from a
generated ``pyproject.toml``: its components are our ServerApp and ClientApp, its
``[tool.flwr.app.config]`` is the run's configuration flattened by
:func:`fleetfl.coordinator.config.to_run_config` (so ``context.run_config`` carries it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetfl import __version__
from fleetfl.coordinator.config import Config, to_run_config

SERVER_APP = "fleetfl.coordinator.server_app:app"
CLIENT_APP = "fleetfl.client.app:app"
FINISHED = "finished"


class ControlError(RuntimeError):
    """A Control API call failed; the message carries Flower's error code and text."""


@dataclass(frozen=True)
class RunInfo:
    """A run as the SuperLink reports it: ``status`` is e.g. ``running`` or
    ``finished:completed``; ``details`` Flower's explanation (e.g. of a failure)."""

    run_id: int
    status: str
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run is over (completed, failed or stopped)."""
        return self.status.startswith(FINISHED)


def app_pyproject(config: Config) -> dict[str, Any]:
    """The Flower App ``pyproject.toml`` (as a dict) that runs ``config`` with our apps."""
    sections: dict[str, dict[str, Any]] = {}
    for flat_key, value in to_run_config(config).items():
        section, _, key = flat_key.partition(".")
        sections.setdefault(section, {})[key] = value
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        # The ClientApp must come from the same fleetfl as the ServerApp (message contract).
        "project": {"name": "fleetfl-run", "version": __version__,
                    "dependencies": [f"fleetfl=={__version__}"]},
        "tool": {"flwr": {"app": {
            "publisher": "fleetfl",
            "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
            "config": sections,
        }}},
    }


def build_fab(config: Config) -> bytes:
    """A FAB (Flower App Bundle) holding only the generated ``pyproject.toml``."""
    from flwr.cli.build import build_fab_from_files

    pyproject = tomli_w.dumps(app_pyproject(config)).encode()
    fab, _ = build_fab_from_files({"pyproject.toml": pyproject})
    return fab


def read_public_keys(path: Path) -> dict[bytes, str]:
    """Authorized SuperNode keys, one OpenSSH public key per line (``#`` comments allowed).

    Returns PEM SubjectPublicKeyInfo bytes (Flower's registry form) -> the line's comment.
    """
    keys: dict[bytes, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(line.encode())
        except (ValueError, TypeError) as err:
            raise ControlError(f"{path}:{number}: not an OpenSSH public key ({err})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ControlError(f"{path}:{number}: Flower needs an EC (NIST curve) key, "
                               f"got {type(key).__name__}; make one with `fleetfl keys client`")
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        parts = line.split()
        keys[pem] = " ".join(parts[2:]) or f"line {number}"
    return keys


def write_flwr_connection(flwr_home: Path, address: str, ca: Path | None) -> Path:
    """``FLWR_HOME/config.toml`` naming our SuperLink ``fleetfl``, for the ``flwr`` CLI.

    With it, ``FLWR_HOME=STATE/flwr flwr ls fleetfl`` (or ``flwr log RUN fleetfl``) works on
    the coordinator host.
    """
    conn: dict[str, Any] = {"address": address}
    if ca is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(ca)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": "fleetfl", "fleetfl": conn}}))
    return path


class ControlClient:
    """A Control API connection to ``address`` (TLS verified with ``ca`` unless insecure)."""

    def __init__(self, address: str, ca: Path | None, flwr_home: Path) -> None:
        # Flower's CLI keeps credentials under FLWR_HOME; ours lives in the state directory.
        os.environ["FLWR_HOME"] = str(flwr_home)
        write_flwr_connection(flwr_home, address, ca)
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        conn = SuperLinkConnection(name="fleetfl", address=address,
                                   root_certificates=str(ca) if ca else None,
                                   insecure=ca is None)
        with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..."
            self._client = init_http_client_from_connection(conn)

    def close(self) -> None:
        """Close the HTTP connection."""
        self._client.close()

    def _call(self, method: str, request: Any) -> Any:
        from flwr.supercore.error import FlowerError

        try:
            return getattr(self._client, method)(request)
        except httpx.HTTPStatusError as err:
            flower = FlowerError.from_json(err.response.text)
            text = f"[code {flower.code}] {flower}" if flower else err.response.text
            raise ControlError(f"{method}: {text}") from None
        except httpx.HTTPError as err:
            raise ControlError(f"{method}: SuperLink unreachable ({err})") from None

    def wait_ready(self, timeout_s: float, alive: Any = lambda: True) -> None:
        """Block until the Control API answers (``alive()`` false or timeout: ControlError)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.list_runs()
                return
            except ControlError as err:
                if not alive():
                    raise ControlError("the SuperLink exited during start-up") from None
                if time.monotonic() > deadline:
                    raise ControlError(f"the SuperLink did not answer in {timeout_s:.0f} s: "
                                       f"{err}") from None
                time.sleep(0.5)

    def list_runs(self) -> list[RunInfo]:
        """Every run the SuperLink knows, oldest first."""
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("ListRuns", ListRunsRequest())
        runs = [_run_info(run) for run in res.run_dict.values()]
        return sorted(runs, key=lambda r: r.run_id)

    def run(self, run_id: int) -> RunInfo:
        """One run's status."""
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self._call("ListRuns", ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise ControlError(f"run {run_id} is unknown to the SuperLink")
        return _run_info(res.run_dict[run_id])

    def stop_unfinished_runs(self) -> list[int]:
        """Stop runs left pending/running by a crash (their ServerApp is gone); their ids."""
        from flwr.proto.control_pb2 import StopRunRequest

        stopped = []
        for run in self.list_runs():
            if not run.finished:
                try:
                    self._call("StopRun", StopRunRequest(run_id=run.run_id))
                except ControlError as err:
                    if "already finished" not in str(err).lower():
                        raise
                stopped.append(run.run_id)
        return stopped

    def start_run(self, fab: bytes) -> int:
        """Submit a FAB as a new run; its id."""
        from flwr.common.serde import fab_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        req = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})))
        res = self._call("StartRun", req)
        if not res.HasField("run_id"):
            raise ControlError("StartRun: the SuperLink did not create a run")
        return int(res.run_id)

    def stream_logs(self, run_id: int, out: IO[str], after: float = 0.0) -> float:
        """Append the run's ServerApp log to ``out`` as it comes (returns when the run ends or
        the connection drops); the timestamp to continue after."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        req = StreamLogsRequest(run_id=run_id, after_timestamp=after)
        try:
            for res in self._client.StreamLogs(req):
                out.write(res.log_output)
                out.flush()
                after = max(after, res.latest_timestamp)
        except httpx.HTTPError:
            pass  # SuperLink gone or stopping: the caller decides whether to retry
        return after

    def sync_nodes(self, authorized: dict[bytes, str]) -> tuple[list[str], list[int]]:
        """Register every authorized key; unregister nodes whose key is no longer listed.

        Returns (names registered now, node ids unregistered). Keys already registered are
        left alone, so their node ids (and the coordinator's view of them) stay stable.
        """
        from flwr.proto.control_pb2 import (
            ListNodesRequest,
            RegisterNodeRequest,
            UnregisterNodeRequest,
        )

        known = {bytes(n.public_key): n.node_id
                 for n in self._call("ListNodes", ListNodesRequest()).nodes_info
                 if n.status != "unregistered"}
        added = []
        for pem, name in authorized.items():
            if pem not in known:
                self._call("RegisterNode", RegisterNodeRequest(public_key=pem, name=name[:64]))
                added.append(name)
        removed = [node for pem, node in known.items() if pem not in authorized]
        for node in removed:
            self._call("UnregisterNode", UnregisterNodeRequest(node_id=node))
        return added, removed


def _run_info(run: Any) -> RunInfo:
    status = run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
    return RunInfo(int(run.run_id), status, run.status.details)
