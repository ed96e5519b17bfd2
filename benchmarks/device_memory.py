"""The smallest memory a device process trains in: a cgroup limit bisected, page cache dropped.

A device process (Flower's SuperNode modules, torch, fleetfl's client, the digits data and
CNN) is started in a cgroup v1 memory group of ``--limits`` MiB each, after the kernel's page
cache is dropped, so that the shared libraries it maps (libtorch alone is ~400 MB on disk) are
read and charged to its own group, as on a board where it is the only Python process. It
imports what a device imports, loads a shard, measures what it would register
(``measured_runtime``: VmRSS), then trains ``--steps`` steps of batch 32. Reported per limit:
whether it finished, was OOM-killed or was still thrashing after ``--timeout`` seconds
(paging its libraries in and out), the group's peak charge (``memory.max_usage_in_bytes``),
how often it hit the limit, the process's VmRSS / RssAnon / RssFile after training, and its
major page faults during the timed steps (after 2 warm-up steps).

There is no swap here, so anonymous memory must fit; file-backed pages (library code, the data
file) can be dropped and read again, which is what lets a process run below its VmRSS.

    python -m benchmarks.device_memory [--limits 400 300 280 260 240] [--steps 40]
                                       [--timeout 180]

Needs root (cgroup v1 and ``/proc/sys/vm/drop_caches``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from benchmarks.memory_cgroup import MemoryGroup

CHILD = r"""
import json, os, re, sys, time
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))  # join first

def status():
    d = dict(re.findall(r"(\w+):\s+(\d+) kB", open("/proc/self/status").read()))
    return {k: int(d[k]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

import flwr.app, flwr.clientapp, flwr.supernode.start_client_internal  # the SuperNode's code
import fleetfl.client.supernode, fleetfl.client.runner, fleetfl.client.app
from fleetfl.client.local import TaskSettings, load_local_task
from fleetfl.client.memory import measured_runtime
from fleetfl.client.solver import fedprox_train

settings = TaskSettings("digits", '{"model": "cnn"}', 0, 1, '{"rpi-zero-2w": 1}', 0)
local = load_local_task(settings, {"data-path": sys.argv[2], "device": "rpi-zero-2w"})
out = {"registered_runtime": measured_runtime(local)}
from fleetfl.devices.memory_stats import major_faults
fedprox_train(local.fresh_model(), local.x_train, local.y_train, mu=0.01, lr=0.05,
              batch_size=32, steps=2, seed=0)  # warm: the first steps read cold code anyway
start, faults = time.perf_counter(), major_faults()
result = fedprox_train(local.fresh_model(), local.x_train, local.y_train, mu=0.01, lr=0.05,
                       batch_size=32, steps=int(sys.argv[3]), seed=0)
out.update(steps=result.steps, train_s=time.perf_counter() - start,
           major_faults=major_faults() - faults, **status())
print(json.dumps(out))
"""


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False if not allowed."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_limit(limit_mib: int, shard: Path, steps: int, timeout_s: float) -> dict[str, Any]:
    """One device process under ``limit_mib``: finished, OOM-killed, or thrashing (still
    paging its libraries in and out after ``timeout_s``; then killed), and what the kernel
    saw."""
    group = MemoryGroup(limit_mib * 2**20, name="fleetfl-devmem")
    try:
        dropped = drop_caches()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(group.path), str(shard),
                                 str(steps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            outcome = "trained" if proc.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            outcome = "thrashing"
        row: dict[str, Any] = {"limit_mib": limit_mib, "page_cache_dropped": dropped,
                               "outcome": outcome, "returncode": proc.returncode,
                               **group.stats()}
        if outcome == "trained":
            row.update(json.loads(stdout.splitlines()[-1]))
        else:
            row["stderr_tail"] = stderr[-400:]
        row["trained"] = outcome == "trained" and row.get("steps") == steps
        return row
    finally:
        group.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[400, 300, 280, 260, 240])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds before a run counts as thrashing")
    parser.add_argument("--label", default="device_memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetfl-devmem-") as tmp:
        shard = Path(tmp) / "client-0.npz"
        subprocess.run([sys.executable, "-m", "fleetfl.coordinator.cli", "data", "split",
                        "--dataset", "digits", "--num-clients", "3", "--out", tmp],
                       check=True, capture_output=True)
        rows = [run_limit(limit, shard, args.steps, args.timeout) for limit in args.limits]
    fits = [r["limit_mib"] for r in rows if r["trained"]]
    emit(args.label, {"steps": args.steps, "runs": rows,
                      "smallest_limit_trained_mib": min(fits) if fits else None})


if __name__ == "__main__":
    main()
