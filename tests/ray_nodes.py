"""Ray nodes on 127.0.0.1 for tests and benchmarks: ``ray start --block`` per node, each in
its own process group (``ray stop`` would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fleetfl.client.daemon import THREAD_VARS, free_port
from fleetfl.client.state_store import ENV as STATE_ENV

RAY = Path(sys.executable).with_name("ray")
TESTS = Path(__file__).resolve().parent


def cluster_env(pythonpath: list[Path]) -> dict[str, str]:
    """The nodes' environment: the user's task modules on PYTHONPATH, one BLAS thread per
    worker (OMP, MKL, OpenBLAS), and no client state directory (per-node directories are not
    shared, so a client's state stays in Flower's context: README, "Bigger fleets")."""
    paths = [*map(str, pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
           **dict.fromkeys(THREAD_VARS, "1"), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    env.pop(STATE_ENV, None)
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


@contextlib.contextmanager
def two_nodes(env: dict[str, str], logs: Path, cpus: int = 1) -> Iterator[str]:
    """A head and a second node (its own ``cpus`` and temp dir) on 127.0.0.1; yields the
    head's address and stops both afterwards."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_tmp, node_tmp = Path("/tmp") / f"ray-h{port}", Path("/tmp") / f"ray-n{port}"
    head = start_node(["--head", f"--port={port}", f"--temp-dir={head_tmp}",
                       "--include-dashboard=false"], env, logs / f"head-{port}.log", cpus)
    node = None
    try:
        wait_for_nodes(address, 1, env, 120)
        node = start_node([f"--address={address}", f"--temp-dir={node_tmp}"], env,
                          logs / f"node-{port}.log", cpus)
        wait_for_nodes(address, 2, env, 120)
        yield address
    finally:
        for proc in (node, head):
            if proc is not None:
                stop_node(proc)
        for path in (head_tmp, node_tmp):
            shutil.rmtree(path, ignore_errors=True)
