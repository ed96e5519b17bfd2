"""Synthetic FedScale-format traces: calibrated capacity, the assumed availability, the CLI."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from fleetfl.coordinator.cli import main
from fleetfl.devices import trace_gen
from fleetfl.devices.traces import AvailabilityTrace, CapacityTrace

N = 20_000


def test_capacity_reproduces_fedscales_quantiles() -> None:
    entries = trace_gen.capacity(N, seed=3)
    ms = np.array([e["computation"] for e in entries.values()])
    kbps = np.array([e["communication"] for e in entries.values()])
    for values, table in ((ms, trace_gen.COMPUTE_MS_QUANTILES),
                          (kbps, trace_gen.BANDWIDTH_KBPS_QUANTILES)):
        got = np.percentile(values, [10, 25, 50, 75, 90])
        want = np.array(table)[[2, 5, 10, 15, 18]]
        np.testing.assert_allclose(got, want, rtol=0.08)
        assert table[0] <= values.min() and values.max() <= table[-1]
    # the published cross-checks of the full 500k file: ~26 % under 3 Mbit/s, median ~6.1-6.2
    assert 0.24 < np.mean(kbps < 3000) < 0.29 and 5800 < np.median(kbps) < 6600
    assert 0.60 < np.mean(ms < 100) < 0.66  # FedScale's fast mode: 63.5 %
    assert abs(np.corrcoef(np.argsort(np.argsort(ms)), np.argsort(np.argsort(kbps)))[0, 1]) < 0.03


def test_availability_follows_its_stated_parameters(tmp_path: Path) -> None:
    entries = trace_gen.availability(4_000, seed=1, online_fraction=0.25,
                                     mean_window_s=3 * 3600, period_s=2 * 86400)
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(entries))
    trace = AvailabilityTrace.load(tmp_path / "a.pkl")
    times = np.random.default_rng(0).uniform(0, 2 * 86400, 40)
    online = np.mean([trace.online(np.arange(len(trace)), t).mean() for t in times])
    assert 0.22 < online < 0.28
    windows = [b - a for e in entries.values() for a, b in zip(e["active"], e["inactive"],
                                                               strict=True)]
    assert 2.4 * 3600 < np.mean(windows) < 3.1 * 3600  # truncation at the period shortens some
    for e in entries.values():
        assert e["duration"] == sum(b - a for a, b in zip(e["active"], e["inactive"],
                                                          strict=True))
        assert e["finish_time"] == 2 * 86400 and e["active"] == sorted(e["active"])
        assert e["inactive"][-1] <= e["finish_time"]


def test_bad_availability_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="online_fraction"):
        trace_gen.availability(3, online_fraction=1.0)
    with pytest.raises(ValueError, match="mean_window_s"):
        trace_gen.availability(3, mean_window_s=10 * 86400)


@pytest.mark.parametrize("fmt", [[], ["--pickle"]])
def test_cli_writes_traces_the_simulation_reads(tmp_path: Path, fmt: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "generate", "--clients", "50", "--out", str(tmp_path), *fmt]) == 0
    suffix = ".pkl" if fmt else ".json"
    capacity = CapacityTrace.load(tmp_path / f"capacity{suffix}")
    availability = AvailabilityTrace.load(tmp_path / f"availability{suffix}")
    assert len(capacity) == len(availability) == 50
    assert "fleet.capacity_trace" in capsys.readouterr().out
    assert main(["traces", "generate", "--clients", "0", "--out", str(tmp_path)]) == 2
    assert main(["traces", "generate", "--clients", "5", "--online-fraction", "2",
                 "--out", str(tmp_path)]) == 2
