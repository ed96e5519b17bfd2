"""Round latency of the deployed service, and how much of it is fleetfl's own.

    python -m benchmarks.service_latency [--clients 3 10] [--rounds 12] [--secure]
                                         [--no-plain] [--ab KEY=VALUE] [--label current]
                                         [--memory-limit-mib MIB ...]

``--ab KEY=VALUE`` runs every configuration twice, side by side: as configured and with that
coordinator setting (``variant`` in each row), alternating which goes first.

1. **ClientApp process costs.** Flower's default SuperNode starts a fresh ``flwr-clientapp``
   process for every message (fleetfl's device no longer does: ``client/runner.py``); the same
   steps are timed here in fresh processes (median of ``--repeats``): Python start-up, Flower's
   imports (``flwr.app``, ``flwr.clientapp``), then ours on top (``import fleetfl.client.app``,
   the train path's extra imports, reading the device's shard, building the model).
   ``-X importtime`` splits the import time by package. ``--repeats 0`` skips this part.
2. **End to end.** ``fleetfl coordinator start`` (TLS + SuperNode authentication) and N
   ``fleetfl client start`` on 127.0.0.1, digits CNN, every client in every round (the
   coordinator waits for all N: ``federation.min_clients``), plain or (``--secure``) int8 +
   SecAgg+. Round latency = the difference of consecutive rounds' ``wall_time_s`` (committed
   rows); round 1 (joining) and the last round (federated evaluation) are left out; median
   and p95. Time to register: from ``fleetfl client start`` (once the ServerApp waits) to
   the device's first reply (its SuperNode logs "Sending: query message"). A sampler reads
   the peak RSS (``VmHWM``) of each device's processes from /proc: the ``fleetfl client
   start`` supervisor, and the SuperNode (which runs the ClientApp) with any process under it.

Everything runs the ``fleetfl`` of this checkout (``FLEETFL_CLI`` overrides the command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLAIN, emit
from benchmarks.memory_cgroup import MemoryGroup
from fleetfl.client.daemon import free_port

CLI = shlex.split(os.environ.get("FLEETFL_CLI", f"{sys.executable} -m fleetfl.coordinator.cli"))
_PROBE = r"""
import json, sys, time
t, c = [time.perf_counter()], [time.process_time()]


def mark():
    t.append(time.perf_counter())
    c.append(time.process_time())


import flwr.app, flwr.clientapp
mark()
import fleetfl.client.app
mark()
import torch, fleetfl.client.solver, fleetfl.tasks.models  # what a train message needs
mark()
from fleetfl.client.local import TaskSettings, load_local_task
s = TaskSettings("digits", '{"model": "cnn"}', 0, 3, '{"rpi4": 1}', 0)
local = load_local_task(s, {"data-path": sys.argv[1], "device": "rpi4"})
mark()
local.fresh_model()
mark()
names = ("flower_imports", "our_app_import", "train_path_imports", "data_load", "model_build")
out = {}
for i, name in enumerate(names):
    out[name + "_s"] = t[i + 1] - t[i]
    out[name + "_cpu_s"] = c[i + 1] - c[i]
print(json.dumps(out))
"""


def _median_runs(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        times.append(time.perf_counter() - start)
    return times


def import_split(modules: str) -> dict[str, float]:
    """Seconds of import time by top-level package (``-X importtime`` self times)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {modules}"],
                          capture_output=True, text=True, check=True, timeout=300)
    split: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].startswith("import time:") or "self" in parts[0]:
            continue
        top = parts[2].strip().split(".")[0]
        group = {"scipy": "sklearn+scipy", "sklearn": "sklearn+scipy"}.get(top, top)
        split[group] = split.get(group, 0.0) + int(parts[0].split(":")[1]) / 1e6
    keep = ("flwr", "torch", "sklearn+scipy", "fleetfl", "numpy")
    out = {k: round(split.get(k, 0.0), 3) for k in keep}
    out["other (Flower's and torch's dependencies)"] = round(
        sum(v for k, v in split.items() if k not in keep), 3)
    return out


def client_process_costs(shard: Path, repeats: int) -> dict[str, Any]:
    """Median timings of the steps of one ClientApp process (see the module docstring)."""
    python = statistics.median(_median_runs([sys.executable, "-c", "pass"], repeats))
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _PROBE, str(shard)], capture_output=True,
                             text=True, check=True, timeout=300).stdout
        runs.append(json.loads(out))
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    def ours(kind: str, suffix: str) -> float:
        steps = ["our_app_import", "data_load"]
        if kind == "train":
            steps += ["train_path_imports", "model_build"]
        return round(sum(med[f"{step}{suffix}"] for step in steps), 3)

    return {
        "python_startup_s": round(python, 3), **med,
        "ours_per_register_process_s": ours("register", "_s"),
        "ours_per_train_process_s": ours("train", "_s"),
        "ours_per_train_process_cpu_s": ours("train", "_cpu_s"),
        "flower_per_process_s": round(python + med["flower_imports_s"], 3),
        "flower_per_process_cpu_s": round(med["flower_imports_cpu_s"], 3),
        "import_split_s": import_split("flwr.app, flwr.clientapp, fleetfl.client.app, "
                                       "fleetfl.client.solver, fleetfl.tasks.models"),
    }


class PeakMemory(threading.Thread):
    """Samples ``VmHWM`` (peak RSS, bytes) of the devices' processes.

    A device is a ``fleetfl client start`` (the supervisor) and the ``flower-supernode`` under
    it whose command line mentions ``tag`` (the benchmark's directory); SuperExec and ClientApp
    processes (Flower's subprocess mode) are found as its descendants.
    """

    KINDS = ("flwr-clientapp", "flower-supernode", "flower-superexec", "client start")

    def __init__(self, tag: str) -> None:
        super().__init__(daemon=True)
        self.tag, self.stop_event = tag, threading.Event()
        self.peak: dict[str, int] = {}

    @staticmethod
    def _table() -> dict[int, tuple[int, str, int]]:
        """pid -> (parent pid, command line, VmHWM bytes) of every readable process."""
        table = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                # fleetfl starts the SuperNode as `python -m fleetfl.client.supernode`.
                cmd = cmd.replace("fleetfl.client.supernode", "flower-supernode")
                status = Path(f"/proc/{entry}/status").read_text().splitlines()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
            table[int(entry)] = (int(fields.get("PPid", "0")), cmd, hwm)
        return table

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            table = self._table()
            roots = {pid for pid, (_, cmd, _) in table.items()
                     if ("flower-supernode" in cmd or "client start" in cmd) and self.tag in cmd}
            for pid, (ppid, cmd, hwm) in table.items():
                chain, hops = ppid, 0
                while chain not in roots and chain in table and hops < 5:
                    chain, hops = table[chain][0], hops + 1
                if pid not in roots and chain not in roots:
                    continue
                kind = next((k for k in self.KINDS if k in cmd), None)
                if kind is not None:
                    self.peak[kind] = max(self.peak.get(kind, 0), hwm)



class Registered(threading.Thread):
    """Seconds from start to each device's first reply (in its log), polled every 0.1 s."""

    def __init__(self, logs: list[Path]) -> None:
        super().__init__(daemon=True)
        self.logs, self.start_time = logs, time.monotonic()
        self.seconds: dict[int, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1) and len(self.seconds) < len(self.logs):
            for i, path in enumerate(self.logs):
                if i not in self.seconds and path.is_file() and \
                        "Sending: query message" in path.read_text(errors="replace"):
                    self.seconds[i] = round(time.monotonic() - self.start_time, 2)


def _p95(values: list[float]) -> float | None:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)] if values else None


def end_to_end(clients: int, rounds: int, root: Path, secure: bool = False,
               extra: tuple[str, ...] = (), limit_mib: int | None = None) -> dict[str, Any]:
    """Run the service with ``clients`` local devices; round latencies and peak memory."""
    def cli(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*CLI, *args], cwd=root, start_new_session=True,
                                stdin=subprocess.DEVNULL, **kw)

    load_before = os.getloadavg()[0]
    assert cli("keys", "init", "--out", "keys", "--clients", str(clients),
               stdout=subprocess.DEVNULL).wait(300) == 0
    assert cli("data", "split", "--dataset", "digits", "--num-clients", str(clients),
               "--out", "shards", stdout=subprocess.DEVNULL).wait(300) == 0
    port = free_port()
    sets = [f"federation.rounds={rounds}", f"federation.num_clients={clients}",
            f"federation.clients_per_round={clients}", f"federation.min_clients={clients}",
            "federation.round_timeout_s=600", f"federation.evaluate_every={rounds}",
            "fleet.mix={rpi4=1}", *PLAIN]
    if secure:
        sets += ["compression.update_bits=8", "secagg.enabled=true"]
    sets += extra
    with open(root / "coordinator.log", "wb") as log:
        coord = cli("coordinator", "start", "--state", "state", "--address", f"127.0.0.1:{port}",
                    "--tls-cert", "keys/server.pem", "--tls-key", "keys/server.key",
                    "--tls-ca", "keys/ca.pem", "--authorized-clients",
                    "keys/authorized_clients.txt", *[a for s in sets for a in ("--set", s)],
                    stdout=log, stderr=subprocess.STDOUT)
    profile = {"name": "bench", "ram_bytes": 2**32, "memory_budget_bytes": 2**31,
               "train_flops_per_s": 4.8e9, "uplink_bytes_per_s": 2.5e6,
               "downlink_bytes_per_s": 1.25e7, "availability": 1.0}
    (root / "device.json").write_text(json.dumps(profile))
    up = time.monotonic()  # devices start once the ServerApp waits for them
    while "waiting for devices" not in (root / "coordinator.log").read_text(errors="replace"):
        if coord.poll() is not None or time.monotonic() - up > 300:
            raise RuntimeError(f"the coordinator did not start: see {root / 'coordinator.log'}")
        time.sleep(0.2)
    sampler = PeakMemory(str(root))
    sampler.start()
    registered = Registered([root / f"client-{i}.log" for i in range(clients)])
    registered.start()
    devices, groups = [], []
    for i in range(clients):
        with open(root / f"client-{i}.log", "wb") as log:
            devices.append(cli("client", "start", "--coordinator", f"127.0.0.1:{port}",
                               "--data", f"shards/client-{i}.npz", "--tls-ca", "keys/ca.pem",
                               "--auth-key", f"keys/clients/client-{i}", "--index", str(i),
                               "--device", str(root / "device.json"),
                               "--workdir", str(root / f"work-{i}"), stdout=log,
                               stderr=subprocess.STDOUT))
        if limit_mib is not None:  # the device's whole tree (supervisor, SuperNode) under it
            groups.append(MemoryGroup(limit_mib * 2**20))
            groups[-1].add(devices[-1].pid)
    try:
        code = coord.wait(3600)
    finally:
        sampler.stop_event.set()
        registered.stop_event.set()
        for proc in [coord, *devices]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [coord, *devices]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    cgroups = [group.stats() for group in groups]
    for group in groups:
        group.remove()
    rows = [json.loads(line) for line in
            (root / "state" / "rounds" / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_time_s"] for r in rows]
    latencies = [round(b - a, 2) for a, b in zip(walls, walls[1:], strict=False)]
    steady = latencies[:-1]  # the last round also evaluates
    return {
        "clients": clients, "secure": secure, "variant": list(extra), "rounds": len(rows),
        "coordinator_exit": code,
        "round1_s_incl_join": round(walls[0], 2) if walls else None,
        "round_latency_s": latencies,
        "round_latency_median_s": statistics.median(steady) if steady else None,
        "round_latency_p95_s": _p95(steady),
        "register_s": registered.seconds,
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "failed_client_rounds": sum(r["failed"] for r in rows),
        "peak_rss_bytes": sampler.peak,
        "memory_limit_mib": limit_mib, "device_cgroups": cgroups,
        # The machine is shared: the 1-minute load average before and after the run.
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--secure", action="store_true", help="also run int8 + SecAgg+")
    parser.add_argument("--label", default="current", help="results file suffix")
    parser.add_argument("--no-e2e", action="store_true", help="only the ClientApp process costs")
    parser.add_argument("--no-plain", action="store_true", help="with --secure: secure only")
    parser.add_argument("--ab", metavar="KEY=VALUE", help="also run each with this setting")
    parser.add_argument("--memory-limit-mib", type=int, nargs="+", metavar="MIB",
                        help="run each device in a memory cgroup of this limit (one run per "
                             "limit; needs root and cgroup v1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetfl-bench-") as tmp:
        root = Path(tmp)
        subprocess.run([*CLI, "data", "split", "--dataset", "digits", "--num-clients", "3",
                        "--out", str(root / "probe")], check=True, capture_output=True)
        costs = (client_process_costs(root / "probe" / "client-0.npz", args.repeats)
                 if args.repeats > 0 else None)
        runs = []
        kinds = [False, True] if args.secure else [False]
        if args.secure and args.no_plain:
            kinds = [True]
        variants: list[tuple[str, ...]] = [(), (args.ab,)] if args.ab else [()]
        for i, (n, secure) in enumerate((n, s) for n in ([] if args.no_e2e else args.clients)
                                        for s in kinds):
            for j, extra in enumerate(variants if i % 2 == 0 else variants[::-1]):
                for limit in args.memory_limit_mib or [None]:
                    where = root / f"n{n}-{secure}-{i}-{j}-{limit}"
                    where.mkdir()
                    runs.append(end_to_end(n, args.rounds, where, secure, extra, limit))
    emit(f"service_latency_{args.label}", {"client_process": costs, "end_to_end": runs})


if __name__ == "__main__":
    main()
