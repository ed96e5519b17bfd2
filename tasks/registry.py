"""Task lookup by name (built-in or ``module:attribute``) and dataset loading, memoized."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.digits import load_digits_federated
from fleetfl.tasks.synthetic import generate_synthetic
from fleetfl.tasks.task import Task

DATASET_NAMES: tuple[str, ...] = ("synthetic", "digits")


# Flower's simulation instantiates the ClientApp many times per process; caching means the
# data are generated/partitioned once. The returned arrays are shared: do not mutate them.
@lru_cache(maxsize=8)
def load_federated(
    dataset: str,
    *,
    num_clients: int,
    seed: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    partition_alpha: float = 0.5,
) -> FederatedDataset:
    """Load federated dataset ``dataset`` in {"synthetic", "digits"} split over clients.

    Args:
        dataset: dataset name, one of ``DATASET_NAMES``.
        num_clients: number of clients (the synthetic ``num_users``).
        seed: seed of all randomness; equal arguments give identical data.
        alpha, beta: Synthetic(alpha, beta) heterogeneity; used by "synthetic" only.
        iid: the IID variant (Synthetic-IID, or a uniform random partition of digits).
        partition_alpha: Dirichlet label-skew concentration; used by "digits" only.

    Raises:
        ValueError: unknown ``dataset`` or invalid arguments for it.
    """
    if dataset == "synthetic":
        return generate_synthetic(alpha, beta, iid=iid, num_users=num_clients, seed=seed)
    if dataset == "digits":
        return load_digits_federated(
            num_clients, partition_alpha=partition_alpha, seed=seed, iid=iid
        )
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}")


class TaskError(ValueError):
    """A task that cannot be resolved; ``key`` is the config key to blame."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key


def resolve_task(name: str, params: Mapping[str, Any] | None = None) -> Task:
    """The :class:`Task` named ``name`` with keyword arguments ``params``.

    ``name`` is a built-in (``digits``, ``synthetic``) or ``"package.module:attribute"``,
    imported from the working directory or ``PYTHONPATH``; the attribute may be a ``Task``
    subclass (called with ``params``), a ``Task`` instance (``params`` must be empty) or a
    factory returning a ``Task`` (called with ``params``). Raises :class:`TaskError` naming
    ``task.name`` or ``task.params``.
    """
    from fleetfl.tasks.builtin import BUILTIN_TASKS

    params = dict(params or {})
    if name in BUILTIN_TASKS:
        target: Any = BUILTIN_TASKS[name]
    elif ":" in name:
        target = _import_attribute(name)
    else:
        raise TaskError("task.name", f"{name!r} is neither a built-in task "
                                     f"({', '.join(BUILTIN_TASKS)}) nor 'package.module:attribute'")
    if isinstance(target, Task):
        if params:
            raise TaskError("task.params", f"{name} is a Task instance; it takes no parameters "
                                           f"(got {', '.join(params)})")
        task = target
    elif callable(target):
        try:
            task = target(**params)
        except (TypeError, ValueError) as err:
            raise TaskError("task.params", f"{name}: {err}") from None
        if not isinstance(task, Task):
            raise TaskError("task.name", f"{name} returned {type(task).__name__}, not a "
                                         f"fleetfl.Task")
    else:
        raise TaskError("task.name", f"{name} is a {type(target).__name__}, not a Task subclass, "
                                     f"instance or factory")
    task.name = name
    return task


def pythonpath_with_cwd(env: Mapping[str, str]) -> str:
    """``PYTHONPATH`` for a child process that resolves tasks: the working directory first.

    Flower runs the ServerApp and each ClientApp in processes of its own, whose working
    directory is not the user's; with this, ``module:attribute`` imports from where the user
    ran ``fleetfl coordinator start`` or ``fleetfl client start``, as it does in simulation.
    """
    return os.pathsep.join([os.getcwd(), *filter(None, [env.get("PYTHONPATH")])])


def _import_attribute(name: str) -> Any:
    """``package.module:attribute``, importing from the working directory first."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise TaskError("task.name", f"{name!r}: expected 'package.module:attribute'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)  # as `python -m` would; removed again below
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError("task.name", f"cannot import {module_name!r} (from the working "
                                     f"directory or PYTHONPATH): {err}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    try:
        return functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise TaskError("task.name", f"module {module_name!r} has no attribute {attr!r}") from None


def task_from_record(record: Mapping[str, Any]) -> Task:
    """The task a checkpoint's or exported file's task record names.

    A record holds ``name`` and ``params`` (as ``[task]``); records written before the Task
    API hold ``dataset``, ``model``, ``alpha``... and are read as the built-in they name.
    """
    from fleetfl.tasks.builtin import BUILTIN_PARAMS

    if "name" in record:
        return resolve_task(str(record["name"]), dict(record.get("params") or {}))
    name = str(record.get("dataset", ""))
    params = {k: record[k] for k in BUILTIN_PARAMS.get(name, ()) if k in record}
    return resolve_task(name, params)
