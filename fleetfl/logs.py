"""fleetfl's log lines in a process Flower runs (a device's SuperNode, the deployed ServerApp).

Flower configures only its own ``flwr`` logger; without a handler, Python prints nothing below
WARNING for ``fleetfl.*``. :func:`log_to_stderr` gives the ``fleetfl`` logger one stderr handler
(once per process), so its INFO lines (a device's registration, a message's timing) appear next
to Flower's: on a device's console, and in the coordinator's ``serverapp.log``.
"""

from __future__ import annotations

import logging

_MARK = "_fleetfl_stderr"


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send ``fleetfl.*`` records at ``level`` and above to stderr, not to the root logger."""
    logger = logging.getLogger("fleetfl")
    if not any(getattr(h, _MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s: fleetfl: %(message)s"))
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
