"""A cgroup v1 memory group to run a benchmark's device in (needs root; cgroup v1 here).

The test ``tests/test_cgroup.py`` and ``benchmarks.service_latency --memory-limit-mib`` put a
device process tree under a hard memory limit, as a container or ``systemd-run -p MemoryMax``
would, and read back what the kernel saw: the peak usage, how often the limit was hit, and OOM
kills. There is no swap on these machines, so anonymous memory cannot leave; file-backed pages
(shared libraries, the data file) can be dropped and read again.
"""

from __future__ import annotations

import time
import uuid

from fleetfl.devices.cgroup import writable_memory_cgroup


class MemoryGroup:
    """A child memory cgroup with ``limit_bytes``; processes join with :meth:`add`."""

    def __init__(self, limit_bytes: int, name: str = "fleetfl-bench") -> None:
        parent = writable_memory_cgroup()
        if parent is None:
            raise RuntimeError("no writable cgroup v1 memory controller here (needs root)")
        self.path = parent / f"{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit_bytes = limit_bytes

    def add(self, pid: int) -> None:
        """Move ``pid`` into the group; its later children are born in it."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def stats(self) -> dict[str, int]:
        """Peak usage (bytes), times the limit was hit, and OOM kills (newer kernels)."""
        out = {"limit_bytes": self.limit_bytes,
               "max_usage_bytes": int((self.path / "memory.max_usage_in_bytes").read_text()),
               "failcnt": int((self.path / "memory.failcnt").read_text())}
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                out["oom_kills"] = int(value)
        return out

    def remove(self) -> None:
        """Delete the group once its processes are gone (retries for a moment)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
