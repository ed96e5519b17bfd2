"""``flower-supernode`` with a 10-second heartbeat, so a dead device is noticed within 20 s.

A SuperNode promises the SuperLink a heartbeat every ``HEARTBEAT_DEFAULT_INTERVAL`` seconds
(30 in Flower 1.42) and the SuperLink declares the node offline after ``HEARTBEAT_PATIENCE``
(2) intervals without one; only then does it answer the node's pending messages with "node
unavailable" in the node's name. A device that loses power mid-round therefore holds the round
for up to 60 s. Flower has no flag for the interval, so this launcher sets the two module
globals that carry it, then runs the unmodified ``flower-supernode`` entry point:

* ``flwr.supernode.fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL``: the interval the node
  promises (sent with ``ActivateNode`` and every heartbeat);
* ``flwr.supercore.heartbeat.HEARTBEAT_DEFAULT_INTERVAL``: the sender's cadence, sending every
  (interval − 5 s) × 0.7–0.9, i.e. every ~4 s at 10 s.

10 s is the smallest interval the SuperLink accepts (``HEARTBEAT_MIN_INTERVAL``); it costs one
small HTTPS request per device every ~4 s. Both names are checked against the pinned Flower by
``tests/test_service_parts.py``.

    python -m fleetfl.client.supernode [flower-supernode arguments]
"""

from __future__ import annotations

import sys

HEARTBEAT_INTERVAL_S = 10.0
_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")


def set_heartbeat_interval(seconds: float = HEARTBEAT_INTERVAL_S) -> None:
    """Make this process's SuperNode promise (and send) a heartbeat every ``seconds``.

    Raises ``ValueError`` outside the range the SuperLink accepts, ``AttributeError`` if the
    installed Flower no longer has the globals (the pin in pyproject.toml prevents that).
    """
    import importlib

    from flwr.common import constant

    if not constant.HEARTBEAT_MIN_INTERVAL <= seconds <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval {seconds} s is outside the SuperLink's range "
                         f"[{constant.HEARTBEAT_MIN_INTERVAL}, {constant.HEARTBEAT_MAX_INTERVAL}]")
    for name in _MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise AttributeError(f"{name} has no HEARTBEAT_DEFAULT_INTERVAL: not Flower 1.42?")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def main() -> None:
    """Run Flower's SuperNode with this module's heartbeat interval."""
    set_heartbeat_interval()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
