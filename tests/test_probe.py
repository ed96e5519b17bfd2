"""Device probing: RAM, cores and the micro-benchmark make a valid profile; no eager torch."""

from __future__ import annotations

import subprocess
import sys

from fleetfl.devices.probe import bench_flops_per_step, cpu_cores, probe, ram_bytes


def test_ram_and_cores_are_plausible() -> None:
    total, available = ram_bytes()
    assert 2**26 < total < 2**50 and 0 < available <= total
    assert cpu_cores() >= 1


def test_benchmark_flops_are_counted_from_the_layers() -> None:
    conv1 = 2 * 1 * 16 * 9 * 64
    conv2 = 2 * 16 * 32 * 9 * 64
    fc = 2 * 512 * 64 + 2 * 64 * 10
    assert bench_flops_per_step(batch=1) == 3 * (conv1 + conv2 + fc)
    assert bench_flops_per_step(batch=10) == 10 * bench_flops_per_step(batch=1)


def test_probe_makes_a_valid_profile() -> None:
    profile = probe(seconds=0.05)
    assert profile.availability == 1.0
    assert profile.memory_budget_bytes <= profile.ram_bytes
    # Any CPU that runs PyTorch trains this model faster than 10 MFLOP/s, slower than 10 TFLOP/s.
    assert 1e7 < profile.train_flops_per_s < 1e13
    assert "Measured" in profile.sources["train_flops_per_s"]
    assert profile.to_dict()["name"].startswith("probed-")


def test_importing_probe_does_not_import_torch() -> None:
    code = "import sys, fleetfl.devices.probe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "False"
