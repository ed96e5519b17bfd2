"""The ``fleetfl`` command line, as a user runs it (subprocesses, real Flower/Ray engine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fleetfl.coordinator.report import SUMMARY_FIELDS


def _fleetfl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetfl.coordinator.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_option_and_key():
    proc = _fleetfl("simulate", "--help")
    assert proc.returncode == 0
    for needle in ("--config", "--set", "--out", "federation.clients_per_round",
                   "fleet.drop_stragglers", "strategy.mu", "task.name", "task.params"):
        assert needle in proc.stdout


def test_bad_config_is_one_clear_error(tmp_path):
    proc = _fleetfl("simulate", "--set", "federation.rounds=-3", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "federation.rounds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-done


@pytest.mark.e2e
def test_simulation_learns_and_writes_results(tmp_path):
    out = tmp_path / "run"
    proc = _fleetfl(
        "simulate", "--no-progress", "--out", str(out),
        "--set", "task.model=logreg", "--set", "federation.num_clients=8",
        "--set", "federation.clients_per_round=4", "--set", "federation.rounds=6",
        "--set", "fleet.stragglers=0.5", "--set", "fleet.mix={rpi4=1,phone-high=1}",
        "--set", "compression.update_bits=8", "--set", "compression.prune_final_sparsity=0.5",
        "--set", "compression.prune_end_round=3", "--set", "compression.downlink_bits=16",
        "--set", "secagg.enabled=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["rounds"] == len(rows) == 6
    assert summary["final_accuracy"] > 0.5  # chance is 0.1 on ten digits
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["clients_total"] == 8
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in rows) > 0
    assert summary["downlink_bytes_total"] == sum(r["downlink_bytes"] for r in rows) > 0
    assert summary["simulated_time_s"] == pytest.approx(sum(r["round_time_s"] for r in rows))
    assert summary["simulated_time_s"] > 0 and summary["wall_time_s"] > 0
    assert summary["stragglers_total"] > 0
    assert summary["compression_ratio_uplink"] > 4  # int8 and half the weights pruned
    assert rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert summary["config"]["fleet"]["stragglers"] == 0.5
    assert (out / "report.png").stat().st_size > 10_000
    assert "final_accuracy" in proc.stdout  # the final table
    assert "pruning (values not sent)" in proc.stdout and "uplink sent" in proc.stdout
