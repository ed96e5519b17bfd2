"""The fleet the coordinator samples from, as arrays: one entry per device, no object each.

Cohort selection (:func:`fleetfl.coordinator.planning.draw_cohort`) reads a device's
availability, memory budget and data size for every member of the population each round. Held
as :class:`ClientInfo` objects that is a Python object and a registration message per device;
held as arrays it is 36 bytes per device (node id, fleet index, profile, examples, runtime),
and a :class:`ClientInfo` is made only for the devices a round selects.

Two sources:

* :meth:`Population.of_clients`: the devices that registered (deployment, and simulation on
  Ray, where Flower's engine owns the node ids);
* :class:`SimulatedFleet`: a simulation on the local engine, where the coordinator derives each
  virtual device from the run's config exactly as the client would report it (the fleet's seed
  and mix, the size of its data partition), so no register message is sent at all and a
  population of 100,000 costs a few MB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fleetfl.coordinator.registry import ClientInfo
from fleetfl.devices.profiles import DeviceProfile

log = logging.getLogger(__name__)
NO_RUNTIME = -1  # runtime_bytes of a device that reported none (plans use fleet.runtime_memory_mib)


@dataclass(frozen=True, eq=False)
class Population:
    """N devices: ``node_ids[i]``, ``indices[i]`` (fleet index), ``profiles[profile_of[i]]``,
    ``num_examples[i]``, ``runtime_bytes[i]`` (bytes, or :data:`NO_RUNTIME`)."""

    node_ids: np.ndarray  # uint64 (Flower node ids are 64-bit unsigned)
    indices: np.ndarray  # int64
    profiles: tuple[DeviceProfile, ...]
    profile_of: np.ndarray  # int32 positions in profiles
    num_examples: np.ndarray  # int64
    runtime_bytes: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.node_ids)

    def client(self, i: int) -> ClientInfo:
        """Member ``i`` as a :class:`ClientInfo`."""
        runtime = int(self.runtime_bytes[i])
        return ClientInfo(int(self.node_ids[i]), int(self.indices[i]),
                          self.profiles[int(self.profile_of[i])], int(self.num_examples[i]),
                          None if runtime == NO_RUNTIME else runtime)

    def availability(self) -> np.ndarray:
        """Each member's probability of being online in a round (float64)."""
        return np.array([p.availability for p in self.profiles], dtype=float)[self.profile_of]

    @classmethod
    def of_clients(cls, clients: Sequence[ClientInfo]) -> Population:
        """The registered ``clients``, in the order given."""
        profiles: dict[DeviceProfile, int] = {}
        kind = [profiles.setdefault(c.device, len(profiles)) for c in clients]
        return cls(
            node_ids=np.array([c.node_id for c in clients], dtype=np.uint64),
            indices=np.array([c.index for c in clients], dtype=np.int64),
            profiles=tuple(profiles), profile_of=np.array(kind, dtype=np.int32),
            num_examples=np.array([c.num_examples for c in clients], dtype=np.int64),
            runtime_bytes=np.array([NO_RUNTIME if c.runtime_bytes is None else c.runtime_bytes
                                    for c in clients], dtype=np.int64))


class SimulatedFleet:
    """A simulated population known without registration (local engine).

    Member ``i`` is node ``node_id_of(i)``, device ``profiles[kind[i]]`` (the fleet's seed and
    mix: :func:`fleetfl.devices.fleet.fleet_kinds`, what the simulated client itself reports)
    and ``sizes[i]`` training examples (its partition). It has the interface of
    :class:`fleetfl.coordinator.registry.FleetRegistry` that the strategy uses.
    """

    def __init__(self, profiles: tuple[DeviceProfile, ...], kind: np.ndarray,
                 sizes: Sequence[int], node_id_of: Callable[[int], int],
                 max_examples: int = 1_000_000) -> None:
        if len(kind) != len(sizes):
            raise ValueError(f"{len(kind)} devices but {len(sizes)} data partitions")
        n = len(kind)
        self.population = Population(
            node_ids=np.array([node_id_of(i) for i in range(n)], dtype=np.uint64),
            indices=np.arange(n, dtype=np.int64), profiles=profiles,
            profile_of=np.asarray(kind, dtype=np.int32),
            num_examples=np.minimum(np.asarray(sizes, dtype=np.int64), max_examples),
            runtime_bytes=np.full(n, NO_RUNTIME, dtype=np.int64))

    @property
    def size(self) -> int:
        """Devices in the population."""
        return len(self.population)

    def wait_for(self, grid: object, min_clients: int, wait_s: float) -> None:
        """Nothing to wait for: every simulated device exists from the start."""
        if min_clients > self.size:
            raise ValueError(f"federation.min_clients = {min_clients} exceeds the "
                             f"{self.size} simulated devices")
