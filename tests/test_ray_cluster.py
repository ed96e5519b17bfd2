"""A simulation on a two-node Ray cluster on 127.0.0.1, started as the README says.

Node 1: ``ray start --head``; node 2: ``ray start --address`` with its own CPU and its own temp
dir. ``fleetfl simulate --set federation.ray_address=...`` runs the default stack (int8,
pruning, SecAgg+) with its clients spread over both nodes: the task notes each training's Ray
node, and every round must aggregate its whole cohort. Each ``ray start --block`` runs in its
own process group, killed at the end (``ray stop`` would stop every Ray on the machine).
About 1.5 min, so it runs with ``make ray-check`` (CI runs it after ``make test``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_nodes import RAY, TESTS, cluster_env, two_nodes

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(os.environ.get("FLEETFL_RAY_CLUSTER") != "1",
                    reason="set FLEETFL_RAY_CLUSTER=1 (make ray-check) to start two Ray nodes")
@pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed")
def test_a_simulation_runs_on_two_ray_nodes(tmp_path: Path) -> None:
    env = cluster_env([TESTS])  # every node imports the user's task: tests/cluster_task.py
    with two_nodes(env, tmp_path) as address:
        marks, out = tmp_path / "marks.txt", tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "fleetfl.coordinator.cli", "simulate", "--no-progress",
             "--out", str(out), "--set", f"federation.ray_address='{address}'",
             "--set", "task.name='cluster_task:NodeMarkingDigits'",
             "--set", "task.params.model='logreg'", "--set", f"task.params.marks='{marks}'",
             "--set", "federation.num_clients=6",
             "--set", "federation.clients_per_round=4", "--set", "federation.rounds=2"],
            env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["aggregated"] == r["selected"] >= 2 and r["secagg_aborted"] == 0
               for r in rows)
    trained_on = marks.read_text().split()
    assert len(set(trained_on)) == 2, trained_on  # clients ran on both nodes
    assert len(trained_on) == sum(r["received"] for r in rows)
