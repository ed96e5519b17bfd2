"""The memory limit of this process's cgroup: a container's or a systemd unit's ``MemoryMax``.

A device that runs fleetfl in a container (or under ``systemd-run -p MemoryMax=...``) has less
memory than ``/proc/meminfo`` says; the kernel OOM-kills the process at the cgroup's limit.
:func:`cgroup_memory_limit` reads it, for cgroup v2 (``memory.max``) and v1
(``memory.limit_in_bytes``), from the process's own cgroup path in ``/proc/self/cgroup``.
No library reads this (``psutil`` does not); the two file formats are the kernel's
(Documentation/admin-guide/cgroup-v2.rst, cgroup-v1/memory.rst).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 2**62


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's cgroup may use, or None (no limit, or not Linux)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # v2 unified hierarchy
            limit = _read(root / rel / "memory.max")
            if limit is not None:
                return limit
        elif "memory" in controllers.split(","):  # v1 memory controller
            limit = _read(root / "memory" / rel / "memory.limit_in_bytes")
            if limit is not None and limit < _V1_UNLIMITED:
                return limit
    return None


def _read(path: Path) -> int | None:
    """An integer limit file; None when absent, unreadable or ``max``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def writable_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory directory, if this process may make a child group in
    it (root, a delegated hierarchy): tests and benchmarks put a device under a limit there."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            here = CGROUP_ROOT / "memory" / path.lstrip("/")
            return here if os.access(here, os.W_OK) else None
    return None
