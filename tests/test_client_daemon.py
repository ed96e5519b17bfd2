"""``fleetfl client start`` before and around the SuperNode: checks, work directories, exits.

The SuperNode runs for real where it matters (an unreachable coordinator); a served round is
``test_service_e2e.py``'s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fleetfl.client.client_cmd import default_workdir
from fleetfl.client.exits import explain_exit
from fleetfl.tasks.data_format import save_npz

# Real tails of Flower 1.42 SuperNodes that failed (run by hand against a TLS coordinator).
WRONG_CA = ["\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.\n",
            "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
            "Failed to initialize the connection to the SuperLink.\n",
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate signature "
            "failure (_ssl.c:1006)\n"]
KEY_REFUSED = ["\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
               "Failed to initialize the connection to the SuperLink.\n",
               "[code: 2004] Failed to activate SuperNode.\n",
               "INFO:     Finished server process [16238]\n"]
UNREACHABLE = ["\x1b[91mERROR \x1b[0m:     Exit Code: 305\n",
               "Failed to initialize the connection to the SuperLink.\n",
               "[Errno 111] Connection refused\n"]


@pytest.mark.parametrize(("tail", "says"), [
    (WRONG_CA, "not signed by --tls-ca ca.pem"),
    (KEY_REFUSED, "refused this device's key"),
    (UNREACHABLE, "cannot reach the coordinator at h:9"),
    (["ERROR : Exit Code: 999\n", "Something new happened.\n"],
     "Flower exit code 999: Something new happened."),
    (["INFO : bye\n"], "exited with status 3"),
])
def test_a_supernode_exit_is_explained(tail: list[str], says: str) -> None:
    assert says in explain_exit(3, tail, "h:9", "ca.pem")


def test_a_supernode_killed_by_the_kernel_is_explained_as_out_of_memory() -> None:
    # As seen under a 230 MiB cgroup: the tail even has an old connection retry in it.
    tail = ["WARNING :   Connection attempt failed, retrying in 0.54 seconds\n",
            "INFO :      SuperNode ID: 13510500850636462640\n"]
    said = explain_exit(-9, tail, "h:9", "ca.pem")
    assert "out-of-memory" in said and "cannot reach" not in said


def test_clients_sharing_a_host_get_their_own_work_directory(tmp_path: Path) -> None:
    a, b = default_workdir(tmp_path / "a" / "shard.npz"), default_workdir(tmp_path / "shard.npz")
    assert a != b and a.name.startswith("shard-")
    assert default_workdir(tmp_path / "a" / ".." / "a" / "shard.npz") == a


def _cli(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetfl.coordinator.cli", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_data_that_does_not_fit_the_task_stops_before_connecting(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shard = save_npz(tmp_path / "s.npz", rng.random((20, 1, 8, 9)), rng.integers(0, 10, 20))
    done = _cli("client", "start", "--insecure", "--coordinator", "127.0.0.1:1", "--data",
                str(shard), "--device", "rpi4", "--task", "digits", "--workdir",
                str(tmp_path / "w"), timeout=120)
    assert done.returncode == 2
    assert "s.npz" in done.stderr and "(1, 8, 8)" in done.stderr
    assert "connecting" not in done.stdout


def test_retries_bound_the_attempts_on_an_unreachable_coordinator(tmp_path: Path) -> None:
    """A real SuperNode, a port nobody listens on: it gives up, saying why (Flower alone
    retries forever)."""
    rng = np.random.default_rng(0)
    shard = save_npz(tmp_path / "s.npz", rng.random((20, 1, 8, 8)), rng.integers(0, 10, 20))
    started = time.monotonic()
    done = _cli("client", "start", "--insecure", "--coordinator", "127.0.0.1:1", "--data",
                str(shard), "--device", "rpi4", "--retries", "0", "--workdir",
                str(tmp_path / "w"), timeout=300)
    assert done.returncode != 0
    assert "cannot reach the coordinator at 127.0.0.1:1" in done.stdout
    assert "giving up after 1 failed attempt(s) (--retries 0)" in done.stdout
    assert time.monotonic() - started < 240


@pytest.mark.parametrize(("extra", "says"), [
    (["--program", "p.pte"], "--program is the ExecuTorch training program: add --runtime"),
    (["--runtime", "executorch", "--program", "missing.pte"], "no such file"),
])
def test_runtime_flags_are_checked_before_connecting(tmp_path: Path, extra: list[str],
                                                      says: str) -> None:
    rng = np.random.default_rng(0)
    shard = save_npz(tmp_path / "s.npz", rng.random((20, 1, 8, 8)), rng.integers(0, 10, 20))
    done = _cli("client", "start", "--insecure", "--coordinator", "127.0.0.1:1", "--data",
                str(shard), "--device", "rpi4", *extra, timeout=120)
    assert done.returncode == 2 and says in done.stderr
