"""Plain Flower's deployed round latency: the baseline for ``benchmarks/service_latency.py``.

    python -m benchmarks.flower_deployed [--clients 3 10] [--rounds 12]

Flower 1.42 as its docs deploy it, on 127.0.0.1 without TLS: ``flower-superlink`` (its own
SuperExec starts the ServerApp), N ``flower-supernode`` in the default ``subprocess`` isolation
(a SuperExec per node, one ``flwr-clientapp`` process per message), and a tiny app submitted as
a FAB over the Control API: Flower's ``FedAvg`` over every node, and a ClientApp that adds
small noise to a 38,000-value ``ArrayRecord`` (the digits CNN's size) with numpy, so that the
figure is Flower's own cost of a round, with no training. The ServerApp's ``evaluate_fn``
records the wall time of every round; round latency is their differences, round 1 left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from fleetfl.client.daemon import free_port

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.0.0"
dependencies = ["flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "tinyapp.server_app:app"
clientapp = "tinyapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
num-nodes = {nodes}
times-file = "{times}"
"""
SERVER_APP = """
import time

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, path = int(cfg["num-nodes"]), str(cfg["times-file"])
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.5)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        with open(path, "a") as f:
            f.write(f"{server_round} {time.time()}\\n")
        return MetricRecord({"round": server_round})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    weights = ArrayRecord([np.zeros(38_000, dtype=np.float32)])
    strategy.start(grid=grid, initial_arrays=weights, num_rounds=int(cfg["num-server-rounds"]),
                   evaluate_fn=evaluate)
"""
CLIENT_APP = """
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    rng = np.random.default_rng()
    new = [a + rng.normal(0, 0.01, a.shape).astype(a.dtype) for a in arrays]
    content = RecordDict({"arrays": ArrayRecord(new),
                          "metrics": MetricRecord({"num-examples": 100})})
    return Message(content, reply_to=msg)
"""



def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_tiny_fab(rounds: int, nodes: int, times: Path) -> bytes:
    """The tiny app as a FAB (Flower App Bundle)."""
    from flwr.cli.build import build_fab_from_files

    files = {"pyproject.toml": PYPROJECT.format(rounds=rounds, nodes=nodes, times=times).encode(),
             "tinyapp/__init__.py": b"", "tinyapp/server_app.py": SERVER_APP.encode(),
             "tinyapp/client_app.py": CLIENT_APP.encode()}
    fab, _ = build_fab_from_files(files)
    return fab


def run(nodes: int, rounds: int, root: Path) -> dict[str, Any]:
    """One deployment of ``nodes`` SuperNodes; round latencies from the ServerApp's times."""
    from fleetfl.coordinator.control import ControlClient

    env = {**os.environ, "FLWR_HOME": str(root / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    port = free_port()
    procs = []

    def start(argv: list[str], log: str) -> None:
        with open(root / log, "wb") as out:
            procs.append(subprocess.Popen(argv, cwd=root, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    start([_bin("flower-superlink"), "--insecure", "--port", str(port),
           "--database", str(root / "state.db"), "--disable-runtime-dependency-installation"],
          "superlink.log")
    times = root / "times.txt"
    try:
        os.environ["FLWR_HOME"] = str(root / "flwr")
        control = ControlClient(f"127.0.0.1:{port}", None, root / "flwr")
        control.wait_ready(120)
        for i in range(nodes):
            start([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(free_port()), "--node-config", f"partition-id={i}"],
                  f"supernode-{i}.log")
        started = time.monotonic()
        run_id = control.start_run(build_tiny_fab(rounds, nodes, times))
        while not control.run(run_id).finished and time.monotonic() - started < 3600:
            time.sleep(1.0)
        status = control.run(run_id).status
        control.close()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    stamps = [float(line.split()[1]) for line in times.read_text().splitlines()[1:]] \
        if times.is_file() else []  # the first line is round 0 (before any training)
    latencies = [round(b - a, 2) for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"clients": nodes, "status": status, "rounds": len(stamps),
            "round_latency_s": latencies,
            "round_latency_median_s": statistics.median(latencies) if latencies else None,
            "load_average": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    runs = []
    for n in args.clients:
        with tempfile.TemporaryDirectory(prefix="flower-deployed-") as tmp:
            runs.append(run(n, args.rounds, Path(tmp)))
            print(json.dumps(runs[-1]), file=sys.stderr)
    emit("flower_deployed", {"runs": runs})


if __name__ == "__main__":
    main()
