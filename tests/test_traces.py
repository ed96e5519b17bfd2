"""FedScale-format device traces: reading them safely, and the cohort and clock following them."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fleetfl.coordinator.config import ConfigError, from_dict
from fleetfl.coordinator.planning import PlanSettings, draw_cohort
from fleetfl.coordinator.registry import ClientInfo
from fleetfl.devices.clock import compute_time_s, transfer_time_s
from fleetfl.devices.profiles import get_profile
from fleetfl.devices.traces import AvailabilityTrace, CapacityTrace, FleetTraces, TraceError

CAPACITY = {7: {"computation": 20.0, "communication": 8000.0},
            3: {"computation": 100.0, "communication": 800.0}}
# Client 0 (id 1): online in [0, 50] of every 100 s; client 1 (id 2): in [60, 90].
BEHAVIOUR = {1: {"active": [0], "inactive": [50], "finish_time": 100, "duration": 3, "model": "x"},
             2: {"active": [60], "inactive": [90], "finish_time": 100}}


def _pickle(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data))
    return path


def test_a_capacity_trace_sets_speeds_as_fedscale_charges_them(tmp_path):
    for path in (_pickle(tmp_path, "cap.pkl", CAPACITY), tmp_path / "cap.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(CAPACITY))
        trace = CapacityTrace.load(path)
        assert list(trace.ms_per_sample) == [100.0, 20.0]  # client-id order: 3, then 7
        rpi4 = get_profile("rpi4")
        slow = trace.apply(rpi4, 0, flops_per_sample=1e6)
        # 3 x 100 ms a training sample, whatever the model; 800 kbit/s = 100,000 B/s both ways.
        assert compute_time_s(slow, 10 * 1e6) == pytest.approx(10 * 0.3)
        assert transfer_time_s(slow, uplink_bytes=100_000, downlink_bytes=0) == pytest.approx(1)
        assert slow.ram_bytes == rpi4.ram_bytes  # memory stays the profile's
        assert trace.apply(rpi4, 3, 1e6) == trace.apply(rpi4, 1, 1e6)  # entry i mod T


def test_availability_follows_the_windows_and_repeats(tmp_path):
    trace = AvailabilityTrace.load(_pickle(tmp_path, "beh.pkl", BEHAVIOUR))
    idx = np.array([0, 1, 2, 3])
    assert trace.online(idx, 10.0).tolist() == [True, False, True, False]
    assert trace.online(idx, 75.0).tolist() == [False, True, False, True]
    assert trace.online(idx, 255.0).tolist() == [False, False, False, False]  # 55: in neither
    assert trace.online(idx, 1_000_010.0).tolist() == [True, False, True, False]


def test_a_pickle_that_would_run_code_is_refused_and_does_not(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = _pickle(tmp_path, "evil.pkl", {1: {"computation": Evil(), "communication": 1.0}})
    with pytest.raises(TraceError, match="not posix.system|not os.system|only dicts"):
        CapacityTrace.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("data, match", [
    ({1: {"computation": -1.0, "communication": 5.0}}, "client 1: 'computation'"),
    ({1: {"computation": 1.0}}, "client 1: 'communication'"),
    ({}, "non-empty mapping"),
    ([1, 2], "non-empty mapping"),
])
def test_bad_capacity_entries_name_the_client_and_key(tmp_path, data, match):
    with pytest.raises(TraceError, match=match):
        CapacityTrace.load(_pickle(tmp_path, "bad.pkl", data))


@pytest.mark.parametrize("entry", [
    {"active": [10], "inactive": [5], "finish_time": 100},
    {"active": [0, 10], "inactive": [5], "finish_time": 100},
    {"active": [20, 10], "inactive": [30, 15], "finish_time": 100},
    {"active": [0], "inactive": [5], "finish_time": 0},
])
def test_bad_windows_are_refused(tmp_path, entry):
    with pytest.raises(TraceError, match="client 4"):
        AvailabilityTrace.load(_pickle(tmp_path, "bad.pkl", {4: entry}))


def test_a_bad_trace_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "missing.pkl"
    with pytest.raises(ConfigError, match=r"fleet\.availability_trace"):
        from_dict({"fleet": {"availability_trace": str(path)}})
    bad = _pickle(tmp_path, "bad.pkl", {1: {"computation": "fast", "communication": 1}})
    with pytest.raises(ConfigError, match=r"fleet\.capacity_trace.*'computation'"):
        from_dict({"fleet": {"capacity_trace": str(bad)}})


def test_the_cohort_is_drawn_from_who_the_trace_has_online(tmp_path):
    traces = FleetTraces(CapacityTrace.load(_pickle(tmp_path, "c.pkl", CAPACITY)),
                         AvailabilityTrace.load(_pickle(tmp_path, "b.pkl", BEHAVIOUR)), 1e6)
    clients = [ClientInfo(100 + i, i, get_profile("rpi4"), 20) for i in range(40)]
    settings = PlanSettings(clients_per_round=40, local_epochs=1, batch_size=10, stragglers=0,
                            deadline_s=None, seed=0, traces=traces)
    early = draw_cohort(clients, 1, settings, now_s=10.0).members
    late = draw_cohort(clients, 1, settings, now_s=70.0).members
    assert [c.index for c in early] == list(range(0, 40, 2))
    assert [c.index for c in late] == list(range(1, 40, 2))
    # Even clients take trace entry 0 (client id 3: 100 ms), odd ones entry 1 (id 7: 20 ms).
    assert {c.device.train_flops_per_s for c in early} == {1e6 / 0.3}
    assert [c.device.train_flops_per_s for c in late] == pytest.approx([1e6 / 0.06] * 20)
    assert draw_cohort(clients, 1, settings, now_s=55.0).members == []


def test_a_simulation_follows_the_traces(tmp_path):
    """Nobody is online for the first 100 virtual seconds: two idle rounds of 60 s move the
    clock to 120 s, where the even half of the fleet can be sampled (the odd half from 300 s);
    the capacity trace sets round times."""
    behaviour = {i: {"active": [100 + 200 * (i % 2)], "inactive": [1e6], "finish_time": 2e6}
                 for i in range(6)}
    cap = _pickle(tmp_path, "c.pkl", {0: {"computation": 50.0, "communication": 1e4}})
    beh = _pickle(tmp_path, "b.pkl", behaviour)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fleetfl.coordinator.cli", "simulate", "--no-progress",
         "--out", str(out), "--set", "task.model=logreg", "--set", "federation.num_clients=6",
         "--set", "federation.clients_per_round=3", "--set", "federation.rounds=3",
         "--set", "secagg.enabled=false", "--set", f"fleet.capacity_trace={cap}",
         "--set", f"fleet.availability_trace={beh}", "--set", "fleet.mix={rpi4=1}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["selected"] for r in rows] == [0, 0, 3]
    assert rows[-1]["simulated_time_s"] < 300  # so the cohorts were the even clients
    assert [r["simulated_time_s"] for r in rows][:2] == [60.0, 120.0]
    # 50 ms a sample x 3, 2 epochs over at most ~60 examples: seconds, not a profile's ms.
    assert rows[2]["round_time_s"] > 1.0
