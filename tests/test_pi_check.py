"""A fleetfl device on aarch64 (qemu-user), joining a coordinator on 127.0.0.1 for 2 rounds.

``scripts/pi_check.sh`` (``make pi-check``) does the work: an arm64 Debian root, the locked
``[device]`` install in it, a coordinator on this host and ``fleetfl client start`` inside the
root, emulated. It takes minutes even with the root built (see BENCHMARKS.md), so this test runs
only when asked (``FLEETFL_PI_CHECK=1``) and skips, saying what is missing, without root,
qemu-user-static or debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    if os.environ.get("FLEETFL_PI_CHECK") != "1":
        return "set FLEETFL_PI_CHECK=1 to run the aarch64 device under qemu (minutes)"
    if os.geteuid() != 0:
        return "needs root (chroot, bind mounts, binfmt_misc)"
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        return "no qemu-aarch64-static (apt-get install qemu-user-static)"
    if shutil.which("debootstrap") is None:
        return "no debootstrap (apt-get install debootstrap)"
    return None


@pytest.mark.e2e
def test_an_aarch64_device_trains_two_rounds_under_qemu() -> None:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "pi_check.sh")], capture_output=True,
                          text=True, timeout=5400, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["failed_client_rounds"] == 0
    assert result["register_s"] is not None
