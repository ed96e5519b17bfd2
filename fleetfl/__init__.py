"""fleetfl: edge federated learning on Flower.

The public API (loaded on first use, so that ``import fleetfl`` stays light on a device):

* :class:`Task`, :class:`FederatedDataset`, :class:`Split`: bring your own model and data
  (:mod:`fleetfl.tasks.task`);
* :func:`simulate`: run a simulated fleet from a config (:mod:`fleetfl.coordinator.api`);
* :func:`client_app`: the Flower ``ClientApp`` for a task; :func:`start_client`: run a device
  client as ``fleetfl client start`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Task": "fleetfl.tasks.task",
    "FederatedDataset": "fleetfl.tasks.data",
    "Split": "fleetfl.tasks.data",
    "simulate": "fleetfl.coordinator.api",
    "client_app": "fleetfl.client.app",
    "start_client": "fleetfl.client.daemon",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fleetfl' has no attribute {name!r}")
