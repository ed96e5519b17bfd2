"""The coordinator service for real: SuperLink + SuperNodes as processes on 127.0.0.1.

One scenario, run once (module fixture), observed by four tests:

1. ``fleetfl keys init`` makes a CA, the server certificate and client keys; ``fleetfl data
   split`` makes 3 shards; ``fleetfl coordinator start`` runs over TLS with SuperNode
   authentication; 3 ``fleetfl client start`` devices join (one probes itself, ``--device
   auto``; one trains as a phone does, ``--runtime executorch`` on an exported program).
2. After round 1 is committed, device 2 is killed (SIGKILL, its whole process tree): round 2
   must complete with the other two. Its SuperNode promised a heartbeat every 10 s
   (``fleetfl.client.supernode``), so the SuperLink declares it gone within 20 s of its death
   (checked in the SuperLink's database) instead of the round waiting out its timeout.
3. Meanwhile an intruder with a key the coordinator never authorized tries to join, twice:
   refused both times.
4. After round 2 is committed, the coordinator is killed -9 with everything it started (a
   crash, mid-round 3); device 2 comes back; the coordinator restarts on the same ``--state``
   and must resume after the last committed round, run every remaining round exactly once,
   and finish.

Compression, secure aggregation and federated evaluation are on (``EXTRA_SET``;
``FLEETFL_E2E_SET="section.key=value ..."`` adds more). The coordinator's processes run with an
audit hook (``sys.addaudithook``, installed by a ``sitecustomize`` on their ``PYTHONPATH``) that
records every file they open under ``shards/``: a deployed coordinator holds no client data, so
it must record none, while the same hook on device 0 records its own shard (the control).
``FLEETFL_CLI`` runs another ``fleetfl`` command (e.g. an installed one).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetfl.coordinator.state import read_metrics
from fleetfl.devices.profiles import get_profile

# About 2.5-4 minutes, so `make service-check` runs it (CI runs it after `make test`).
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("FLEETFL_SERVICE_E2E") != "1",
    reason="set FLEETFL_SERVICE_E2E=1 (make service-check) to run the service scenario")]

ROUNDS = 3  # kill a device after round 1, crash the coordinator after round 2, resume round 3
PROGRAM = "digits-train.pte"
PHONE = platform.machine() != "aarch64"  # the [executorch] extra is x86-64 only
ROUND_TIMEOUT_S = 90  # a bound only: a dead device is declared gone by its missed heartbeats
CLI = shlex.split(os.environ.get("FLEETFL_CLI", f"{sys.executable} -m fleetfl.coordinator.cli"))
# The deployed run compresses (int8 updates, pruning to 50 % by round 3, so the resumed run
# must restore the masks), aggregates securely (SecAgg+: 4 exchanges per round) and has the
# devices evaluate the final model (the coordinator holds no data to evaluate on).
EXTRA_SET: list[str] = ["compression.update_bits=8", "compression.prune_final_sparsity=0.5",
                        "compression.prune_end_round=3", "secagg.enabled=true",
                        f"federation.evaluate_every={ROUNDS}",
                        *shlex.split(os.environ.get("FLEETFL_E2E_SET", ""))]
STEP_TIMEOUT_S = 420.0  # generous: this machine is shared; a round takes seconds when idle
AUDIT_HOOK = """
import os, sys
_WATCH, _LOG = os.environ.get("FLEETFL_AUDIT_WATCH"), os.environ.get("FLEETFL_AUDIT_LOG")
_ROLE = os.environ.get("FLEETFL_AUDIT_ROLE", "?")

def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        path = os.path.abspath(os.fspath(args[0]))
        if path.startswith(_WATCH):
            with open(_LOG, "a") as log:
                log.write(f"{_ROLE} {os.getpid()} {path}\\n")

if _WATCH and _LOG:
    sys.addaudithook(_hook)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _wait_for(what: str, ready: Callable[[], bool], timeout_s: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Deployment:
    """The processes of one scenario and what was observed."""

    root: Path
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)

    def spawn(self, name: str, *args: str, audit: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = dict(os.environ)
        if audit is not None:  # record the files under shards/ this process tree opens
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.root / "audit"), *filter(None, [env.get("PYTHONPATH")])])
            env.update(FLEETFL_AUDIT_WATCH=str(self.root / "shards"), FLEETFL_AUDIT_ROLE=audit,
                       FLEETFL_AUDIT_LOG=str(self.root / "audit.log"))
        proc = subprocess.Popen([*CLI, *args], cwd=self.root, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        log.close()
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def coordinator(self, name: str) -> subprocess.Popen[bytes]:
        keys = self.root / "keys"
        sets = [f"federation.rounds={ROUNDS}", "federation.num_clients=3",
                "federation.clients_per_round=3", f"federation.round_timeout_s={ROUND_TIMEOUT_S}",
                "federation.min_clients=2",  # secure aggregation needs 2; device 2 dies
                *EXTRA_SET]
        return self.spawn(name, "coordinator", "start", "--state", str(self.root / "state"),
                          "--address", f"127.0.0.1:{self.port}",
                          "--tls-cert", str(keys / "server.pem"),
                          "--tls-key", str(keys / "server.key"), "--tls-ca", str(keys / "ca.pem"),
                          "--authorized-clients", str(keys / "authorized_clients.txt"),
                          *[a for s in sets for a in ("--set", s)], audit="coordinator")

    def device(self, i: int, key: str | None = None) -> subprocess.Popen[bytes]:
        keys = self.root / "keys"
        device = "auto" if i == 2 else str(self.root / "always-on.json")
        # Device 1 trains as a phone does, in ExecuTorch's runtime, on a program exported
        # beforehand; the coordinator treats it as any other device.
        phone = ["--runtime", "executorch", "--program", str(self.root / PROGRAM)] \
            if i == 1 and PHONE else []
        return self.spawn(f"client-{i}", "client", "start", *phone,
                          "--coordinator", f"127.0.0.1:{self.port}",
                          "--data", str(self.root / "shards" / f"client-{i % 3}.npz"),
                          "--tls-ca", str(keys / "ca.pem"),
                          "--auth-key", str(keys / "clients" / (key or f"client-{i}")),
                          "--index", str(i), "--device", device,
                          "--workdir", str(self.root / f"work-{i}"),
                          audit=f"client-{i}" if i == 0 else None)

    def rounds(self) -> list[int]:
        return [row["round"] for row in read_metrics(self.root / "state" / "rounds")]

    def crash_coordinator(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9 the service and every process group it started, at once."""
        pids = json.loads((self.root / "state" / "service.json").read_text())
        for name, pid in pids.items():
            with contextlib.suppress(ProcessLookupError):
                (os.kill if name == "service" else os.killpg)(pid, signal.SIGKILL)
        _kill_group(proc)
        proc.wait(30)


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([*CLI, *args], cwd=cwd, check=True, timeout=300, capture_output=True)


def _scenario(d: Deployment) -> None:
    exporting = _export_program(d.root / PROGRAM) if PHONE else None
    (d.root / "audit").mkdir()
    (d.root / "audit" / "sitecustomize.py").write_text(AUDIT_HOOK)
    _run("keys", "init", "--out", "keys", "--clients", "3", cwd=d.root)
    _run("keys", "client", "--name", "intruder", "--out", "keys/clients", cwd=d.root)
    _run("data", "split", "--dataset", "digits", "--num-clients", "3", "--out", "shards",
         cwd=d.root)
    if exporting is not None:
        _, err = exporting.communicate(timeout=300)
        assert exporting.returncode == 0, err.decode()[-2000:]
    profile = {**get_profile("rpi4").to_dict(), "name": "rpi4-always-on", "availability": 1.0}
    (d.root / "always-on.json").write_text(json.dumps(profile))

    first = d.coordinator("coordinator-1")
    devices = [d.device(i) for i in range(3)]  # they retry until the coordinator is up

    _wait_for("round 1", lambda: len(d.rounds()) >= 1)
    _kill_group(devices[2])  # mid-round 2: its first message is out or about to be
    d.seen["killed_after_round"] = d.rounds()[-1]
    # With the coordinator up and every authorized key registered, a stranger tries to join.
    intruder = d.spawn("intruder", "client", "start", "--coordinator", f"127.0.0.1:{d.port}",
                       "--data", str(d.root / "shards" / "client-0.npz"),
                       "--tls-ca", str(d.root / "keys" / "ca.pem"),
                       "--auth-key", str(d.root / "keys" / "clients" / "intruder"),
                       "--device", "rpi4", "--workdir", str(d.root / "work-intruder"),
                       "--retries", "1")
    d.seen["intruder_exit"] = intruder.wait(STEP_TIMEOUT_S)

    _wait_for("round 2", lambda: len(d.rounds()) >= 2)
    d.crash_coordinator(first)  # mid-round 3
    d.seen["committed_at_crash"] = d.rounds()
    devices[2] = d.device(2)  # the device comes back (same key, same node id)

    second = d.coordinator("coordinator-2")
    d.seen["second_exit"] = second.wait(STEP_TIMEOUT_S * 2)
    d.seen["rows"] = read_metrics(d.root / "state" / "rounds")


EXPORT_PROGRAM = """
import sys
import numpy as np
from fleetfl.client.training_program import build_training_program, save_program
from fleetfl.tasks.builtin import DigitsTask
rng = np.random.default_rng(0)
example = (rng.random((8, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 8))
task = DigitsTask()
save_program(build_training_program(task, task.build_model(0), example), sys.argv[1])
"""


def _export_program(out: Path) -> subprocess.Popen[bytes]:
    """Start exporting the digits CNN's ExecuTorch training program (what ``fleetfl export
    --format executorch-train`` writes from a checkpoint; there is none before the run), in
    a process of its own while the keys and shards are made."""
    return subprocess.Popen([sys.executable, "-c", EXPORT_PROGRAM, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    d = Deployment(tmp_path_factory.mktemp("service"), _free_port())
    try:
        _scenario(d)
    finally:
        for proc in d.procs:  # SIGTERM first: Flower's processes deregister and exit
            _kill_group(proc, signal.SIGTERM)
        for proc in d.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait(10)
    return d


def test_unregistered_client_is_refused(deployment: Deployment) -> None:
    assert deployment.seen["intruder_exit"] != 0
    refusals = deployment.output("intruder").count("Failed to activate SuperNode")
    assert refusals == 2  # the first attempt and one retry, as asked (--retries 1)


def test_rounds_complete_over_tls_with_node_auth(deployment: Deployment) -> None:
    first = deployment.output("coordinator-1")
    assert "coordinator up on https://" in first and "3 newly registered" in first
    assert deployment.seen["second_exit"] == 0, deployment.output("coordinator-2")
    rows = deployment.seen["rows"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["aggregated"] >= 2 for r in rows)
    assert rows[-1]["accuracy"] > 0.5  # federated evaluation on the devices' test splits
    assert rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)  # compression ran, and resumed
    assert all(r["secagg_aborted"] == 0 and r["secagg_uplink_bytes"] > 0 for r in rows)
    # Device 1 trains in ExecuTorch. A round may start with 2 of the 3 devices (min_clients)
    # while the phone, which loads its program first, is still registering: where all 3
    # trained, its reply must say ExecuTorch; it must have said so in some round.
    whole = [r for r in rows if r["selected"] == 3 and r["failed"] == 0]
    assert all(r["executorch"] == int(PHONE) for r in whole), [r["executorch"] for r in rows]
    assert {r["executorch"] for r in rows} <= {0, 1}
    assert any(r["executorch"] for r in rows) == PHONE


def test_client_killed_mid_round_the_round_completes(deployment: Deployment) -> None:
    assert deployment.seen["killed_after_round"] == 1
    round2 = deployment.seen["rows"][1]
    assert round2["round"] == 2 and round2["selected"] == 3
    assert round2["aggregated"] == 2 and round2["failed"] == 1
    # Every device promised the SuperLink a heartbeat every 10 s (fleetfl.client.supernode),
    # and the SuperLink declared device 2 offline when its heartbeats stopped.
    with contextlib.closing(sqlite3.connect(deployment.root / "state" / "superlink.db")) as db:
        nodes = dict(db.execute("SELECT name, heartbeat_interval FROM node").fetchall())
        gone = db.execute("SELECT last_deactivated_at FROM node WHERE name = 'client-2'")
        assert gone.fetchone()[0] is not None
    assert nodes == {"client-0": 10.0, "client-1": 10.0, "client-2": 10.0}


def test_the_coordinator_never_opens_client_data(deployment: Deployment) -> None:
    audit = (deployment.root / "audit.log").read_text().splitlines()
    assert not [line for line in audit if line.startswith("coordinator ")]
    # The control: the same hook in device 0's processes saw it read its shard.
    assert any(line.startswith("client-0 ") and line.endswith("client-0.npz") for line in audit)


def test_the_devices_evaluate_the_global_model(deployment: Deployment) -> None:
    *earlier, last = deployment.seen["rows"]
    assert all(row["evaluation"] == "none" for row in earlier)  # no data on the coordinator
    # The round's cohort evaluates: all 3 devices, or 2 if device 2 came back after the resumed
    # round 3 had sampled its cohort (the restarts race; either is correct).
    assert last["evaluation"] == "federated" and last["fed_failed"] == 0
    assert last["fed_clients"] == last["selected"] >= 2
    assert last["accuracy"] == last["fed_accuracy"] > 0.5 and last["fed_examples"] > 0


def test_coordinator_killed_and_restarted_resumes(deployment: Deployment) -> None:
    committed = deployment.seen["committed_at_crash"]
    assert committed == list(range(1, len(committed) + 1)) and 2 <= len(committed) < ROUNDS
    second = deployment.output("coordinator-2")
    assert f"resuming after round {len(committed)}" in second
    assert "stopped run(s) left unfinished" in second
    printed = [int(line.split()[2].split("/")[0]) for line in second.splitlines()
               if line.startswith("fleetfl: round ")]
    assert printed == list(range(len(committed) + 1, ROUNDS + 1))  # nothing redone twice
