"""Why a device's SuperNode exited, in words a device owner can act on.

Flower's SuperNode logs an ``ExitCode`` (``flwr.supercore.exit.ExitCode``, e.g. "Exit Code:
305") with the cause just before it exits (its process status says less: often 1).
:func:`explain_exit` reads its last output lines: known causes first (they are specific: a
certificate error, a refused key, an unreachable address), then the logged exit code.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence

from fleetfl.devices.cgroup import cgroup_memory_limit

# (pattern in the SuperNode's last output lines, explanation); the first match wins.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), text) for pattern, text in (
        (r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|self[- ]signed",
         "the coordinator's TLS certificate is not signed by --tls-ca {ca}: give the "
         "coordinator's ca.pem (from `fleetfl keys init`)"),
        (r"hostname mismatch|doesn't match|not valid for",
         "the coordinator's TLS certificate does not name the host in --coordinator "
         "{coordinator}: connect by a name or IP given to `fleetfl keys init --host`"),
        (r"WRONG_VERSION_NUMBER|record layer failure|http_request|EOF occurred in violation",
         "TLS failed: the coordinator at {coordinator} does not speak TLS, or that port is "
         "not the coordinator's"),
        (r"Failed to activate SuperNode|\b401\b|unauthenticated|"
         r"node authentication failed",
         "the coordinator refused this device's key: add its .pub with "
         "`fleetfl keys authorize` on the coordinator (or it is still starting)"),
        (r"Connection attempt failed|ConnectError|Connection refused|Name or service",
         "cannot reach the coordinator at {coordinator}: is it running, and is that its "
         "address and port?"),
        (r"Failed to load .*private key|auth.*key.*invalid",
         "Flower could not load --auth-key: make one with `fleetfl keys client`"),
    )
)

# Flower 1.42's ExitCode values, as its log states them ("Exit Code: 305").
_CODES = {
    302: "Flower could not load --auth-key: make one with `fleetfl keys client`",
    303: "--auth-key needs TLS (--tls-ca)",
    305: "the connection to the coordinator at {coordinator} failed",
    600: "--coordinator {coordinator} is not a HOST:PORT address",
    603: "--tls-ca {ca} is not a PEM certificate Flower can use",
    604: "a path given to the SuperNode does not exist",
    606: "the coordinator runs another Flower version than this device",
}
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def explain_exit(status: int | None, tail: Sequence[str], coordinator: str,
                 ca: str = "") -> str:
    """One sentence on why the SuperNode exited with ``status`` after printing ``tail``."""
    if status == -signal.SIGKILL:  # Flower never does this itself; the kernel's OOM killer does
        return _killed(cgroup_memory_limit())
    lines = [_ANSI.sub("", line).strip() for line in tail[-40:]]
    text = "\n".join(lines)
    for pattern, why in _CAUSES:
        if pattern.search(text):
            return why.format(coordinator=coordinator, ca=ca or "(none)")
    codes = [int(m.group(1)) for m in _EXIT_CODE.finditer(text)]
    if codes and codes[-1] in _CODES:
        return _CODES[codes[-1]].format(coordinator=coordinator, ca=ca or "(none)")
    if codes:  # Flower's own explanation follows its "Exit Code" line
        at = max(i for i, line in enumerate(lines) if _EXIT_CODE.search(line))
        detail = " ".join(line for line in lines[at + 1:at + 3] if line)
        return f"the SuperNode stopped with Flower exit code {codes[-1]}: {detail[:300]}"
    return (f"the SuperNode exited with status {status}; the coordinator may be restarting "
            f"(its output is above)")


def _killed(limit_bytes: int | None) -> str:
    where = (f"its memory limit (this process's cgroup: {limit_bytes / 2**20:.0f} MiB)"
             if limit_bytes else "the device's memory")
    return (f"the SuperNode was killed (SIGKILL), most likely by the kernel's out-of-memory "
            f"killer: torch, the model and the data did not fit in {where}; `dmesg` says "
            f"\"Out of memory\" if so. Give it more memory, or stop other programs")
