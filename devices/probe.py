"""Probe this machine into a :class:`DeviceProfile`: RAM, cores and a training micro-benchmark.

``fleetfl client start --device auto`` probes once and hands the profile to every ClientApp
process through a JSON file, so the coordinator plans work from measured, not catalogued,
figures. What is measured and what is assumed:

* ``ram_bytes``: ``MemTotal`` of /proc/meminfo (else ``sysconf``), measured, capped by the
  process's cgroup memory limit (:mod:`fleetfl.devices.cgroup`).
* ``memory_budget_bytes``: 50 % of RAM (the catalog's rule for headless boards), capped by the
  memory available at probe time (``MemAvailable``), so a busy machine gets a smaller budget.
* ``train_flops_per_s``: measured by timing SGD steps of a small CNN shaped like the digits
  model (batch 10, FP32, all cores torch uses), FLOPs counted analytically, x3 for training.
* bandwidths: *not* measured (that needs the coordinator); home-broadband estimates of the
  catalog's Raspberry Pi profiles, overridable with ``uplink_mbit``/``downlink_mbit``.
* ``availability``: 1.0, since a connected node is online; Flower tells the coordinator
  when it is not.

torch is imported only inside :func:`train_flops_per_s`: importing this module stays cheap.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path

from fleetfl.devices.cgroup import cgroup_memory_limit
from fleetfl.devices.profiles import MBIT_PER_S, DeviceProfile

BUDGET_FRACTION = 0.5  # the catalog's headless-board rule (devices/profiles.py)
DEFAULT_UPLINK_MBIT = 20.0  # the catalog's Pi 4/5 home-broadband estimate
DEFAULT_DOWNLINK_MBIT = 100.0
BENCH_BATCH = 10
# Micro-benchmark CNN: conv(1->16,3x3) conv(16->32,3x3) on 8x8, pool, fc 512->64->10.
_CONV = ((1, 16, 8, 8), (16, 32, 8, 8))  # (c_in, c_out, height, width), 3x3 kernels, pad 1
_FC = ((32 * 4 * 4, 64), (64, 10))


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} when absent, e.g. macOS)."""
    info: dict[str, int] = {}
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def ram_bytes() -> tuple[int, int]:
    """``(total, available)`` RAM in bytes; available = total when the OS does not say. Both
    are capped by this process's cgroup memory limit (a container, a systemd unit)."""
    info = _meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", total)
    limit = cgroup_memory_limit()
    if limit is not None:
        total, available = min(total, limit), min(available, limit)
    return int(total), int(available)


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bench_flops_per_step(batch: int = BENCH_BATCH) -> float:
    """FLOPs of one training step (forward + backward = 3x forward) of the benchmark CNN."""
    forward = sum(2 * ci * co * 9 * h * w for ci, co, h, w in _CONV)
    forward += sum(2 * i * o for i, o in _FC)
    return 3.0 * forward * batch


def train_flops_per_s(seconds: float = 1.0, batch: int = BENCH_BATCH) -> float:
    """Effective FP32 training rate (FLOP/s) of small-model PyTorch SGD on this machine."""
    import torch  # here, not at module level: probing is rare, importing devices is not
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand((batch, 1, 8, 8), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(5):  # warm-up: allocator, thread pool, first-call dispatch
        step()
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or steps < 10:
        step()
        steps += 1
    return bench_flops_per_step(batch) * steps / elapsed


def probe(seconds: float = 1.0, *, uplink_mbit: float = DEFAULT_UPLINK_MBIT,
          downlink_mbit: float = DEFAULT_DOWNLINK_MBIT) -> DeviceProfile:
    """Measure this machine into a profile (``seconds`` of benchmark; see module docstring)."""
    total, available = ram_bytes()
    cores = cpu_cores()
    rate = train_flops_per_s(seconds)
    budget = min(int(total * BUDGET_FRACTION), available)
    name = f"probed-{socket.gethostname() or 'host'}"
    net = f"Assumed (not measured): {uplink_mbit:g}/{downlink_mbit:g} Mbit/s up/down."
    return DeviceProfile(
        name=name,
        ram_bytes=total,
        memory_budget_bytes=max(budget, 1),
        train_flops_per_s=rate,
        uplink_bytes_per_s=uplink_mbit * MBIT_PER_S,
        downlink_bytes_per_s=downlink_mbit * MBIT_PER_S,
        availability=1.0,
        sources={
            "ram_bytes": f"Measured: MemTotal on {platform.machine()} {platform.system()}.",
            "memory_budget_bytes": f"Rule: {BUDGET_FRACTION:.0%} of RAM, capped by "
                                   f"MemAvailable at probe time ({available} B).",
            "train_flops_per_s": f"Measured: {seconds:g} s of SGD steps of a digits-sized CNN, "
                                 f"batch {BENCH_BATCH}, {cores} core(s), FLOPs counted "
                                 "analytically (training = 3x forward).",
            "uplink_bytes_per_s": net,
            "downlink_bytes_per_s": net,
            "availability": "A connected node is online; Flower reports when it is not.",
        },
    )
