"""``fleetfl simulate`` on both engines, as a user runs it (fresh processes). The comparison
with Ray (~45 s) runs with ``make ray-check``, which CI runs after ``make test``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fleetfl.coordinator.config import ConfigError, from_dict

SMALL = ["--set", "federation.num_clients=10", "--set", "federation.clients_per_round=5",
         "--set", "federation.rounds=3", "--set", "federation.local_epochs=1",
         "--set", "fleet.mix={rpi4=1,phone-mid=1,rpi-zero-2w=1}"]


def _simulate(out, *sets):
    env = {k: v for k, v in os.environ.items() if k != "FLEETFL_CLIENT_STATE_DIR"}
    proc = subprocess.run([sys.executable, "-m", "fleetfl.coordinator.cli", "simulate",
                           "--no-progress", "--out", str(out), *sets],
                          capture_output=True, text=True, cwd=out.parent, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows


def _model(out):
    return torch.load(out / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get("FLEETFL_RAY_CLUSTER") != "1",
                    reason="set FLEETFL_RAY_CLUSTER=1 (make ray-check runs the Ray scenarios)")
def test_the_local_and_ray_engines_train_the_same_model(tmp_path):
    """Full-stack defaults (int8 both ways, pruning, SecAgg+, memory plans, a Pi Zero that no
    plan fits): the same cohorts, the same model bit for bit; Ray registers every node, the
    local engine derives the fleet."""
    ray_sum, ray_rows = _simulate(tmp_path / "ray", *SMALL, "--set", "federation.engine=ray")
    loc_sum, loc_rows = _simulate(tmp_path / "local", *SMALL, "--set",
                                  "federation.engine=local")
    assert loc_sum["config"]["federation"]["engine"] == "local"
    assert [r["aggregated"] for r in loc_rows] == [r["aggregated"] for r in ray_rows]
    assert [r["unfit"] for r in loc_rows] == [r["unfit"] for r in ray_rows]
    assert sum(r["unfit"] for r in loc_rows) > 0
    assert loc_sum["clients_total"] == ray_sum["clients_total"] == 10
    a, b = _model(tmp_path / "local"), _model(tmp_path / "ray")
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_a_population_larger_than_its_data_on_the_local_engine(tmp_path):
    summary, rows = _simulate(
        tmp_path / "big", "--set", "federation.engine=local",
        "--set", "federation.num_clients=5000", "--set", "federation.data_partitions=50",
        "--set", "federation.clients_per_round=40", "--set", "federation.rounds=2",
        "--set", "federation.local_epochs=1", "--set", "fleet.mix={rpi4=1}")
    assert summary["clients_total"] == 5000
    assert [r["aggregated"] for r in rows] == [40, 40]
    assert rows[-1]["failed"] == 0


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """``fleetfl.simulate`` at a script's top level: the workers must not run the script again
    (``multiprocessing`` would, as ``__mp_main__``), and the script's ``__file__`` survives."""
    script = tmp_path / "run.py"
    script.write_text(
        "import fleetfl\n"
        "print('top level')\n"
        "s = fleetfl.simulate({'federation': {'num_clients': 4, 'clients_per_round': 2,\n"
        "                                     'rounds': 2},\n"
        "                      'task': {'name': 'digits', 'params': {'model': 'logreg'}},\n"
        "                      'output': {'dir': 'out', 'plot': False, 'progress': False}})\n"
        "print('file', __file__ == " + repr(str(script)) + ", s['rounds'], s['failed_total'])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top level") == 1
    assert "file True 2 0" in proc.stdout


@pytest.mark.parametrize("fed, key", [
    ({"num_clients": 10, "data_partitions": 11}, "federation.data_partitions"),
    ({"num_clients": 10, "data_partitions": -1}, "federation.data_partitions"),
])
def test_data_partition_errors_name_the_key(fed, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"federation": fed})
