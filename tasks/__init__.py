"""Tasks: the public Task API, the built-in tasks, datasets, partitioning and models.

Names are loaded on first use (PEP 562), so that importing a light module of this package
(``fleetfl.tasks.task``, ``fleetfl.tasks.data_format``) on a device does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Task": "fleetfl.tasks.task",
    "evaluate_task": "fleetfl.tasks.task",
    "FederatedDataset": "fleetfl.tasks.data",
    "Split": "fleetfl.tasks.data",
    "DigitsTask": "fleetfl.tasks.builtin",
    "SyntheticTask": "fleetfl.tasks.builtin",
    "resolve_task": "fleetfl.tasks.registry",
    "load_federated": "fleetfl.tasks.registry",
    "DATASET_NAMES": "fleetfl.tasks.registry",
    "load_digits_federated": "fleetfl.tasks.digits",
    "generate_synthetic": "fleetfl.tasks.synthetic",
    "dirichlet_label_partition": "fleetfl.tasks.partition",
    "iid_partition": "fleetfl.tasks.partition",
    "MODEL_NAMES": "fleetfl.tasks.models",
    "DigitsCNN": "fleetfl.tasks.models",
    "LogisticRegression": "fleetfl.tasks.models",
    "build_model": "fleetfl.tasks.models",
    "forward_flops_per_sample": "fleetfl.tasks.models",
    "training_flops_per_sample": "fleetfl.tasks.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fleetfl.tasks' has no attribute {name!r}")
