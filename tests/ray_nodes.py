"""Ray nodes on 127.0.0.1 for tests and benchmarks: ``ray start --block`` per node, each in
its own process group (``ray stop`` would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fleetfl.client.daemon import THREAD_VARS

RAY = Path(sys.executable).with_name("ray")
TESTS = Path(__file__).resolve().parent


def cluster_env(pythonpath: list[Path]) -> dict[str, str]:
    """The nodes' environment: the user's task modules on PYTHONPATH, one BLAS thread per
    worker (OMP, MKL, OpenBLAS), and no client state directory (per-node directories are not
    shared, so a client's state stays in Flower's context: README, "Bigger fleets")."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*map(str, pythonpath), os.environ.get("PYTHONPATH", "")]),
        **dict.fromkeys(THREAD_VARS, "1"), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env.pop("FLEETFL_CLIENT_STATE_DIR", None)
    return env


def start_node(args: list[str], env: dict[str, str], log: Path,
               cpus: int = 1) -> subprocess.Popen:
    """``ray start --block --num-cpus=cpus ARGS``, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats",
                                 f"--num-cpus={cpus}", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float) -> None:
    """Until ``ray status`` lists ``count`` nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([str(RAY), "status", "--address", address], env=env,
                                capture_output=True, text=True, timeout=60)
        if status.stdout.count(" node_") >= count:
            return
        time.sleep(1)
    raise AssertionError(f"{count} Ray nodes did not come up:\n{status.stdout}{status.stderr}")


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM the node's process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
