"""A device inside a cgroup memory limit (a container, ``systemd-run -p MemoryMax=``).

The unit tests read fake cgroup files. The end-to-end test (root and a writable cgroup memory
controller, else skipped) runs a device process inside a real cgroup whose limit is far below
its profile's budget: it trains a plan that fits without being OOM-killed, and refuses, before
training, a plan its profile would allow but the cgroup would kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleetfl import protocol as P
from fleetfl.devices.cgroup import cgroup_memory_limit, writable_memory_cgroup
from fleetfl.devices.memory_planner import MIB, check_plan
from fleetfl.devices.memory_stats import training_memory_stats
from fleetfl.devices.profiles import get_profile
from fleetfl.tasks.data_format import save_npz
from fleetfl.tasks.models import build_model


def _fake(tmp_path: Path, proc: str, files: dict[str, str]) -> int | None:
    tmp_path.mkdir(parents=True)
    (tmp_path / "cgroup").write_text(proc)
    for rel, text in files.items():
        (tmp_path / "root" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / rel).write_text(text)
    return cgroup_memory_limit(tmp_path / "cgroup", tmp_path / "root")


def test_v2_and_v1_limits_are_read_and_no_limit_is_none(tmp_path: Path) -> None:
    assert _fake(tmp_path / "a", "0::/app.slice/x\n",
                 {"app.slice/x/memory.max": "536870912\n"}) == 512 * MIB
    assert _fake(tmp_path / "b", "0::/\n", {"memory.max": "max\n"}) is None
    v1 = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"
    assert _fake(tmp_path / "c", v1, {"memory/docker/abc/memory.limit_in_bytes":
                                      "314572800\n"}) == 300 * MIB
    assert _fake(tmp_path / "d", v1, {"memory/docker/abc/memory.limit_in_bytes":
                                      "9223372036854771712\n"}) is None  # v1's "no limit"
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path) is None


CHILD = r"""
import json, os, sys
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))  # join first

from fleetfl.client.local import TaskSettings, load_local_task
from fleetfl.client.memory import decide, measured_runtime
from fleetfl.client.solver import fedprox_train

settings = TaskSettings("digits", '{"model": "cnn"}', 0, 1, '{"rpi4": 1}', 0)
local = load_local_task(settings, {"data-path": sys.argv[2], "device": "rpi4"})
runtime = measured_runtime(local)
plans = json.loads(sys.argv[3])
out = {"runtime": runtime}
for name, cfg in plans.items():
    fit = decide(cfg, local, cfg["plan.batch-size"], measure=True)
    out[name] = fit.refusal
    if fit.refusal is None:
        model = local.fresh_model()
        result = fedprox_train(model, local.x_train, local.y_train, mu=0.01, lr=0.05,
                               batch_size=cfg["plan.batch-size"], steps=20, seed=0,
                               micro_batch=fit.micro_batch)
        out[name + "-steps"] = result.steps
print(json.dumps(out))
"""


@pytest.mark.e2e
def test_a_device_in_a_cgroup_trains_what_fits_and_refuses_what_the_limit_would_kill(
        tmp_path: Path) -> None:
    parent = writable_memory_cgroup()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller here (needs root)")
    group = parent / f"fleetfl-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as err:
        pytest.skip(f"cannot make a cgroup: {err}")
    limit = 700 * MIB  # far below an rpi4 profile's 2 GiB budget
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        rng = np.random.default_rng(0)
        shard = save_npz(tmp_path / "s.npz", rng.random((64, 1, 8, 8)), rng.integers(0, 10, 64))
        stats = training_memory_stats(build_model("cnn", (1, 8, 8), 10), (1, 8, 8))
        per_sample = stats.plain.saved_per_sample + stats.plain.workspace_per_sample
        huge = int(1.2 * limit / per_sample)  # one pass of this batch alone exceeds the limit
        budget = get_profile("rpi4").memory_budget_bytes
        # The control: by its profile alone, the device would accept the huge plan.
        assert check_plan(stats, huge, False, huge, budget, reserved_bytes=300 * MIB) is None

        def plan(batch: int) -> dict:
            return {"plan.batch-size": batch, P.PLAN_MICRO_BATCH: batch,
                    P.PLAN_CHECKPOINTING: False, P.MEMORY_STATS: json.dumps(stats.to_dict()),
                    P.MEMORY_BUDGET_FRACTION: 0.0}

        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(group), str(shard),
             json.dumps({"fits": plan(32), "huge": plan(huge)})],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"killed or failed ({done.returncode}): {done.stderr[-2000:]}"
        out = json.loads(done.stdout.splitlines()[-1])
        assert out["fits"] is None and out["fits-steps"] == 20
        assert out["huge"] is not None and f"budget of {limit}" in out["huge"]
        assert 0 < out["runtime"] < limit
    finally:
        for _ in range(50):  # the child has exited; its cgroup empties a moment later
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
