"""What a client holds locally: its data shard, its device profile and how to build its model.

Two kinds of client, told apart by the SuperNode's ``node_config``:

* **simulated** (``partition-id``): data and device derive from the run's task and fleet
  settings; loading is memoized because Flower's simulation engine calls the ClientApp many
  times in one worker process.
* **real device** (``data-path``): data from the ``.npz`` file at ``data-path``
  (:mod:`fleetfl.tasks.data_format`), device from ``device``: a catalog profile name, the path
  of a JSON profile file (what ``fleetfl client start`` writes), inline JSON, or ``auto``
  (probe once, cached in ``$FLEETFL_DEVICE_CACHE`` or ``~/.cache/fleetfl/device.json``).
  ``client-index`` optionally fixes the client's index in the fleet.

This module imports no torch and no scikit-learn at module level: the ``register`` query needs
only numpy.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetfl.devices.profiles import DeviceProfile, get_profile
from fleetfl.tasks.data import FederatedDataset, Split
from fleetfl.tasks.data_format import check_task
from fleetfl.tasks.registry import resolve_task
from fleetfl.tasks.task import Task

if TYPE_CHECKING:
    import torch
    from torch import nn

DATA_PATH = "data-path"
DEVICE = "device"
CLIENT_INDEX = "client-index"
PARTITION_ID = "partition-id"
AUTO = "auto"

@dataclass(frozen=True)
class TaskSettings:
    """The run settings a client needs, as sent in every message's config (hashable)."""

    name: str  # task.name
    params: str  # task.params as JSON
    seed: int
    num_clients: int
    fleet_mix: str  # JSON object {profile: weight}
    fleet_seed: int
    partitions: int = 0  # data partitions, client i on partition i mod P (0: one per client)

    def task(self) -> Task:
        """The run's task (imports a user task's module)."""
        return _task(self.name, self.params)


@functools.lru_cache(maxsize=8)
def _task(name: str, params: str) -> Task:
    return resolve_task(name, json.loads(params))


def task_settings(cfg: Mapping[str, Any]) -> TaskSettings:
    """Read :class:`TaskSettings` from a message config (keys ``task.*``, ``fleet.*``)."""
    try:
        params = cfg["task.params"]
        return TaskSettings(
            name=str(cfg["task.name"]),
            params=params if isinstance(params, str) else json.dumps(params, sort_keys=True),
            seed=int(cfg["task.seed"]),
            num_clients=int(cfg["federation.num_clients"]),
            fleet_mix=str(cfg["fleet.mix"]),
            fleet_seed=int(cfg["fleet.seed"]),
            partitions=int(cfg.get("federation.data_partitions", 0)),
        )
    except KeyError as err:
        raise ValueError(f"message config lacks key {err.args[0]!r}") from None


@dataclass(frozen=True)
class LocalTask:
    """One client's data (numpy; torch views on demand), device profile and model factory."""

    index: int
    device: DeviceProfile
    x: np.ndarray  # (n, *input_shape), the task's dtype (float32 for the built-ins)
    y: np.ndarray  # int64, (n,)
    task: Task
    seed: int
    test: Split | None = None  # the local test split, for federated evaluation

    @property
    def num_examples(self) -> int:
        """Number of local training examples."""
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    @property
    def x_train(self) -> torch.Tensor:
        """The examples as a torch tensor (zero-copy view)."""
        import torch

        return torch.from_numpy(self.x)

    @property
    def y_train(self) -> torch.Tensor:
        """The labels as a torch tensor (zero-copy view)."""
        import torch

        return torch.from_numpy(self.y)

    def fresh_model(self) -> nn.Module:
        """A model of the task's architecture (weights are overwritten by the global model)."""
        return self.task.build_model(self.seed)


def load_local_task(settings: TaskSettings, node_config: Mapping[str, Any],
                    task: Task | None = None) -> LocalTask:
    """This client's :class:`LocalTask`: a real device's (``data-path``) or a simulated one.

    ``task``: use this task object instead of resolving the run's ``task.name``.
    """
    task = task if task is not None else settings.task()
    if DATA_PATH in node_config:
        index = node_config.get(CLIENT_INDEX)
        data_path = str(node_config[DATA_PATH])
        return _load_device(settings, task, data_path, _stamp(data_path),
                            str(node_config.get(DEVICE, AUTO)),
                            None if index is None else int(index))
    if PARTITION_ID not in node_config:
        raise ValueError(f"node_config has neither '{DATA_PATH}' (a real device's data file) "
                         f"nor '{PARTITION_ID}' (a simulated client): this client has no data")
    return _load_partition(settings, task, int(node_config[PARTITION_ID]))


def _stamp(path: str) -> tuple[int, int]:
    """(mtime in ns, size in bytes) of ``path``: a changed file is read again."""
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)  # the load below reports the error
    return (stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_device(settings: TaskSettings, task: Task, data_path: str, stamp: tuple[int, int],
                 device: str, index: int | None) -> LocalTask:
    """A device's shard and profile, read once per process (a persistent device process
    answers every message of a run) and again when the file changes."""
    data, test = load_checked(task, data_path)
    return LocalTask(
        index=default_index(data_path) if index is None else index,
        device=resolve_device(device),
        x=data.x,
        y=data.y,
        task=task,
        seed=settings.seed,
        test=test,
    )


def load_checked(task: Task, data_path: str) -> tuple[Split, Split | None]:
    """A device's training and (optional) test split from ``data_path``, checked against the
    task's input shape and classes (``DataFormatError``, a ValueError, names file and array)."""
    data, test = task.load_local(data_path), task.load_local_test(data_path)
    for split in (data, test) if test is not None else (data,):
        check_task(split, data_path, task.input_shape, task.num_classes)
    return data, test


def default_index(data_path: str) -> int:
    """A stable fleet index for a device without ``client-index``: a hash of host and path."""
    key = f"{socket.gethostname()}:{Path(data_path).expanduser().resolve()}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def device_cache_path() -> Path:
    """Where ``auto`` keeps the probed profile (``$FLEETFL_DEVICE_CACHE`` overrides)."""
    env = os.environ.get("FLEETFL_DEVICE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fleetfl" / "device.json"


def resolve_device(spec: str) -> DeviceProfile:
    """A profile from a catalog name, a JSON file path, inline JSON or ``auto`` (probed)."""
    spec = spec.strip()
    if spec in ("", AUTO):
        return probed_profile(device_cache_path())
    if spec.startswith("{"):
        return _profile_from_json(spec, "inline device JSON")
    if spec.endswith(".json") or os.sep in spec:
        path = Path(spec).expanduser()
        try:
            text = path.read_text()
        except OSError as err:
            raise ValueError(f"device profile file {path}: {err.strerror or err}") from None
        return _profile_from_json(text, str(path))
    return get_profile(spec)


def _profile_from_json(text: str, where: str) -> DeviceProfile:
    try:
        return DeviceProfile.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a valid device profile: {err}") from None


def probed_profile(cache: Path, seconds: float = 1.0) -> DeviceProfile:
    """The cached probe result, probing this machine (``seconds`` of benchmark) if needed."""
    if cache.is_file():
        return _profile_from_json(cache.read_text(), str(cache))
    from fleetfl.devices.probe import probe

    profile = probe(seconds)
    write_profile(cache, profile)
    return profile


def write_profile(path: Path, profile: DeviceProfile) -> Path:
    """Write ``profile`` as JSON atomically (ClientApp processes may read it concurrently)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=2))
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=8)
def _load_partition(settings: TaskSettings, task: Task, index: int) -> LocalTask:
    if not 0 <= index < settings.num_clients:
        raise ValueError(f"partition-id {index} outside [0, {settings.num_clients})")
    data = _federated_data(settings, task)
    train, test = data.clients[index % data.num_clients]
    return LocalTask(
        index=index,
        device=_fleet(settings.num_clients, settings.fleet_mix, settings.fleet_seed)[index],
        x=train.x,
        y=train.y,
        task=task,
        seed=settings.seed,
        test=test,
    )


@functools.lru_cache(maxsize=2)
def _fleet(num_clients: int, mix: str, seed: int) -> list[DeviceProfile]:
    """The simulated fleet, made once per process (a worker serves many clients)."""
    from fleetfl.devices.fleet import build_fleet

    return build_fleet(num_clients, json.loads(mix), seed)


@functools.lru_cache(maxsize=2)
def _federated_data(settings: TaskSettings, task: Task) -> FederatedDataset:
    """The run's federated data, made once per process (a simulation worker serves many
    virtual clients; the built-ins also cache their loaders)."""
    return task.federated_data(settings.partitions or settings.num_clients, settings.seed)
