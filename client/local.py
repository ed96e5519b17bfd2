"""What a client holds locally: its data shard, its device profile and how to build its model.

A simulated client derives both from the run's task and fleet settings and its
``partition-id``; loading is memoized because Flower's simulation engine calls the ClientApp
many times in one worker process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fleetfl.devices.fleet import build_fleet
from fleetfl.devices.profiles import DeviceProfile
from fleetfl.tasks.models import build_model
from fleetfl.tasks.registry import load_federated


@dataclass(frozen=True)
class TaskSettings:
    """The run settings a client needs, as sent in every message's config (hashable)."""

    dataset: str
    model: str
    alpha: float
    beta: float
    iid: bool
    partition_alpha: float
    seed: int
    num_clients: int
    fleet_mix: str  # JSON object {profile: weight}
    fleet_seed: int


def task_settings(cfg: Mapping[str, Any]) -> TaskSettings:
    """Read :class:`TaskSettings` from a message config (keys ``task.*``, ``fleet.*``)."""
    try:
        return TaskSettings(
            dataset=str(cfg["task.dataset"]),
            model=str(cfg["task.model"]),
            alpha=float(cfg["task.alpha"]),
            beta=float(cfg["task.beta"]),
            iid=bool(cfg["task.iid"]),
            partition_alpha=float(cfg["task.partition_alpha"]),
            seed=int(cfg["task.seed"]),
            num_clients=int(cfg["federation.num_clients"]),
            fleet_mix=str(cfg["fleet.mix"]),
            fleet_seed=int(cfg["fleet.seed"]),
        )
    except KeyError as err:
        raise ValueError(f"message config lacks key {err.args[0]!r}") from None


@dataclass(frozen=True)
class LocalTask:
    """One client's data (as torch tensors), device profile and model factory."""

    index: int
    device: DeviceProfile
    x_train: torch.Tensor
    y_train: torch.Tensor
    model_name: str
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int

    def fresh_model(self) -> nn.Module:
        """A model of the task's architecture (weights are overwritten by the global model)."""
        return build_model(self.model_name, self.input_shape, self.num_classes, seed=self.seed)


def load_local_task(settings: TaskSettings, node_config: Mapping[str, Any]) -> LocalTask:
    """The :class:`LocalTask` of the simulated client ``node_config["partition-id"]``."""
    if "partition-id" not in node_config:
        raise ValueError("node_config has no 'partition-id': this client has no local data")
    return _load_partition(settings, int(node_config["partition-id"]))


@functools.lru_cache(maxsize=8)
def _load_partition(settings: TaskSettings, index: int) -> LocalTask:
    data = load_federated(
        settings.dataset,
        num_clients=settings.num_clients,
        seed=settings.seed,
        alpha=settings.alpha,
        beta=settings.beta,
        iid=settings.iid,
        partition_alpha=settings.partition_alpha,
    )
    if not 0 <= index < data.num_clients:
        raise ValueError(f"partition-id {index} outside [0, {data.num_clients})")
    train, _ = data.clients[index]
    fleet = build_fleet(settings.num_clients, json.loads(settings.fleet_mix), settings.fleet_seed)
    return LocalTask(
        index=index,
        device=fleet[index],
        x_train=torch.from_numpy(train.x),
        y_train=torch.from_numpy(train.y),
        model_name=settings.model,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=settings.seed,
    )
