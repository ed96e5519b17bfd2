"""Per-round cohort selection and per-client work plans (pure: no Flower, no I/O).

Each round, every registered client is online with its device's availability; the coordinator
samples ``clients_per_round`` of the online ones. A fraction ``stragglers`` of the cohort gets a
uniformly drawn smaller number of epochs in [1, E) (the FedProx paper's systems-heterogeneity
setup); with a deadline, every client gets what its device can finish in time.

With memory planning (``PlanSettings.memory``), each client's plan also says how its batches fit
its device's memory budget (micro-batches, activation checkpointing:
:func:`fleetfl.devices.memory_planner.fit_training_plan`), and a client whose device cannot fit
even one sample per pass is left out of the draw.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fleetfl.coordinator.population import NO_RUNTIME, Population
from fleetfl.coordinator.registry import ClientInfo
from fleetfl.devices.clock import transfer_time_s
from fleetfl.devices.fleet import online_mask
from fleetfl.devices.memory_planner import (
    DEFAULT_RUNTIME_BYTES,
    MemoryBreakdown,
    MemoryPlan,
    TrainingMemoryStats,
    fit_training_plan,
    memory_budget_bytes,
)
from fleetfl.devices.traces import FleetTraces
from fleetfl.devices.workplan import WorkPlan, plan_work, sample_stragglers


@dataclass(frozen=True)
class MemorySettings:
    """What memory planning needs: the model's traced training step and the fleet's rules."""

    stats: TrainingMemoryStats  # traced once per run (fleetfl.devices.memory_stats)
    budget_fraction: float = 0.0  # fleet.memory_budget_fraction: 0 = each profile's budget
    runtime_bytes: int = DEFAULT_RUNTIME_BYTES  # fleet.runtime_memory_mib, in bytes


@dataclass(frozen=True)
class PlanSettings:
    """The knobs of cohort planning, from ``[federation]`` and ``[fleet]``."""

    clients_per_round: int
    local_epochs: int
    batch_size: int
    stragglers: float
    deadline_s: float | None
    seed: int
    memory: MemorySettings | None = None  # None: no memory planning
    # Simulation: each profile's availability decides who is online in a round. Deployment:
    # False, a real device is online when its node is connected (FleetRegistry.refresh).
    simulated_availability: bool = True
    min_clients: int = 1  # a round waits for this many registered nodes (FleetRegistry.wait_for)
    round_wait_s: float = 600.0  # ... at most this long (wall seconds)
    # Simulation: device speeds and/or availability from FedScale-format traces.
    traces: FleetTraces | None = None


@dataclass(frozen=True)
class Cohort:
    """One round's draw: the clients selected, and how many online ones were left out for
    memory (with one of them and the reason, for the log)."""

    members: list[ClientInfo]
    unfit_count: int = 0
    unfit_example: tuple[ClientInfo, str] | None = None  # (client, why no memory plan fits)


_SELECTION, _STRAGGLERS = 0, 1  # independent random streams of one round


def round_rng(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """A reproducible RNG for one kind of draw (``stream``) in one round."""
    return np.random.default_rng([seed, server_round, stream])


def memory_plan(client: ClientInfo, settings: PlanSettings) -> MemoryPlan | None:
    """How ``client`` runs its batches within its device's budget; None without memory
    planning. The batch is the largest the client will run: ``batch_size`` or its data size.
    The reserve is the device's own measured runtime when it reported one, else
    ``fleet.runtime_memory_mib``."""
    memory = settings.memory
    if memory is None:
        return None
    budget = memory_budget_bytes(client.device, memory.budget_fraction)
    reserved = memory.runtime_bytes if client.runtime_bytes is None else client.runtime_bytes
    return _fit(memory.stats, min(settings.batch_size, client.num_examples), budget, reserved)


# Plans depend on a handful of numbers that repeat across clients and rounds.
@functools.lru_cache(maxsize=4096)
def _fit(stats: TrainingMemoryStats, batch: int, budget: int, reserved: int) -> MemoryPlan:
    return fit_training_plan(stats, batch, budget, reserved_bytes=reserved)


def draw_cohort(
    clients: Population | Sequence[ClientInfo], server_round: int, settings: PlanSettings,
    now_s: float = 0.0,
) -> Cohort:
    """Sample up to ``clients_per_round`` clients among those online this round whose device
    can fit a memory plan; count the online clients that cannot. ``now_s``: the round's start
    on the virtual clock (seconds), for an availability trace.

    Vectorized over the population: one availability draw per member, one memory plan per
    distinct (device, batch, reserve), and :class:`ClientInfo` objects only for the cohort
    (with their capacity trace's speeds, if any).
    """
    pop = clients if isinstance(clients, Population) else Population.of_clients(clients)
    online = _online(pop, server_round, settings, now_s)
    fits, why = _fitting(pop, settings)
    eligible = np.flatnonzero(online & fits)
    unfit = np.flatnonzero(online & ~fits)
    k = min(settings.clients_per_round, len(eligible))
    rng = round_rng(settings.seed, server_round, _SELECTION)
    picks = rng.choice(eligible, size=k, replace=False)
    example = (pop.client(int(unfit[0])), why(int(unfit[0]))) if len(unfit) else None
    members = [pop.client(int(i)) for i in np.sort(picks)]
    if settings.traces is not None:
        members = [dataclasses.replace(c, device=settings.traces.device(c.device, c.index))
                   for c in members]
    return Cohort(members, len(unfit), example)


def _online(pop: Population, server_round: int, settings: PlanSettings,
            now_s: float) -> np.ndarray:
    """Who is online: everyone (deployed: connected is online), the availability trace at
    ``now_s``, or one draw per member with its profile's availability."""
    if not settings.simulated_availability:
        return np.ones(len(pop), dtype=bool)
    traces = settings.traces
    if traces is not None and traces.availability is not None:
        return traces.availability.online(pop.indices, now_s)
    return online_mask(pop.availability(), server_round, settings.seed)


def _fitting(pop: Population, settings: PlanSettings) -> tuple[np.ndarray, Callable[[int], str]]:
    """Whether each member's device fits a memory plan (all True without memory planning),
    and a function giving why member ``i``'s does not."""
    memory = settings.memory
    if memory is None or len(pop) == 0:
        return np.ones(len(pop), dtype=bool), lambda i: ""
    budgets = np.array([memory_budget_bytes(p, memory.budget_fraction) for p in pop.profiles],
                       dtype=np.int64)[pop.profile_of]
    batch = np.minimum(settings.batch_size, pop.num_examples)
    reserve = np.where(pop.runtime_bytes == NO_RUNTIME, memory.runtime_bytes, pop.runtime_bytes)
    cases, inverse = np.unique(np.stack([batch, budgets, reserve]), axis=1, return_inverse=True)
    inverse = inverse.ravel()
    plans = [_fit(memory.stats, int(b), int(m), int(r)) for b, m, r in cases.T]
    fits = np.array([p.fits for p in plans], dtype=bool)[inverse]
    return fits, lambda i: plans[int(inverse[i])].reason


def select_cohort(
    clients: Sequence[ClientInfo], server_round: int, settings: PlanSettings
) -> list[ClientInfo]:
    """The clients :func:`draw_cohort` selects."""
    return draw_cohort(clients, server_round, settings).members


def plan_cohort(
    cohort: Sequence[ClientInfo],
    server_round: int,
    settings: PlanSettings,
    *,
    flops_per_sample: float,
    downlink_bytes: int,
    uplink_bytes: int,
) -> dict[int, WorkPlan]:
    """One :class:`WorkPlan` per cohort member, keyed by node id, with its memory plan when
    ``settings.memory`` is set (one that does not fit, ``fits=False``, for a client
    :func:`draw_cohort` would have left out).

    ``downlink_bytes``/``uplink_bytes`` are the expected message sizes, used to leave transfer
    time inside the deadline.
    """
    rng = round_rng(settings.seed, server_round, _STRAGGLERS)
    straggler_epochs = sample_stragglers(
        len(cohort), settings.stragglers, settings.local_epochs, rng
    )
    plans = {}
    for client, s_epochs in zip(cohort, straggler_epochs, strict=True):
        transfer = transfer_time_s(
            client.device, uplink_bytes=uplink_bytes, downlink_bytes=downlink_bytes
        )
        plan = plan_work(
            client.device,
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            num_examples=client.num_examples,
            flops_per_sample=flops_per_sample,
            deadline_s=settings.deadline_s,
            transfer_s=transfer,
            straggler_epochs=s_epochs,
        )
        plans[client.node_id] = dataclasses.replace(plan, memory=memory_plan(client, settings))
    return plans


def probe_plan(settings: PlanSettings) -> WorkPlan:
    """A placeholder plan with every config key a real plan of this run has, for estimating
    message sizes before the cohort is planned."""
    memory = None
    if settings.memory is not None:
        big = 2**40  # bytes: more than any device's budget, so no real value serializes longer
        memory = MemoryPlan(settings.batch_size, settings.batch_size, 1, False, big, big,
                            MemoryBreakdown(0, 0, 0, 0, 0), True, "")
    return WorkPlan(1.0, 0, 1, False, memory)
