"""The client's admission test: does the coordinator's memory plan fit this device right now?

Before it trains, a client checks the plan it was sent (batch, micro-batch, checkpointing)
against its own situation with :func:`fleetfl.devices.memory_planner.check_plan`: its device's
budget (its own profile, under the run's ``fleet.memory_budget_fraction``) and the memory its
process already holds. A real device (``node_config["data-path"]``) reads that from
``/proc/self/status`` (VmRSS), after its data and model are loaded; a simulated client shares
its process with others, so it takes the runtime the coordinator assumed
(``fleet.runtime_memory_mib``), as does a device without ``/proc``. The model's training-memory
figures come with the message (``memory-stats``, traced once by the coordinator): tracing here
would import torch's compiler stack, about 70 MiB of resident memory on the device.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetfl import protocol as P
from fleetfl.client.local import DATA_PATH, LocalTask
from fleetfl.devices.cgroup import cgroup_memory_limit
from fleetfl.devices.memory_planner import (
    DEFAULT_RUNTIME_BYTES,
    MIB,
    TrainingMemoryStats,
    check_plan,
    config_settings,
    memory_budget_bytes,
)
from fleetfl.devices.memory_stats import pin_mmap_threshold, rss_bytes


@dataclass(frozen=True)
class MemoryDecision:
    """How to run the batches, or why not to train at all."""

    micro_batch: int  # samples per forward/backward pass
    checkpointing: bool
    refusal: str | None  # None: the plan fits


def is_real_device(node_config: Mapping[str, Any]) -> bool:
    """True for a client on its own device (its process is the device's), not a simulated one."""
    return DATA_PATH in node_config


def prepare_device_process() -> None:
    """Make a device's resident memory follow its live tensors, as the planner assumes
    (``pin_mmap_threshold``); done once per process, before training allocates."""
    _pin_once()


@functools.cache
def _pin_once() -> bool:
    return pin_mmap_threshold()


def resident_before_training(cfg: Mapping[str, Any], *, measure: bool) -> int:
    """Bytes this client's process holds before training: VmRSS when ``measure`` and readable,
    else the runtime the coordinator assumed (``fleet.runtime_memory_mib``)."""
    if measure:
        try:
            return rss_bytes()
        except (OSError, ValueError):  # no /proc (macOS, Windows) or an unexpected format
            pass
    mib = cfg.get(P.RUNTIME_MEMORY_MIB)
    return DEFAULT_RUNTIME_BYTES if mib is None else round(float(mib) * MIB)


def decide(cfg: Mapping[str, Any], local: LocalTask, batch_size: int, *,
           measure: bool) -> MemoryDecision:
    """Read the memory plan in ``cfg`` and check it for ``local``'s device.

    ``batch_size`` is the largest batch this client runs (the plan's, capped by its data).
    Without ``memory-stats`` in ``cfg`` (a coordinator that does not plan memory) there is
    nothing to check against and the plan is taken as it is.
    """
    micro, checkpointing = config_settings(cfg, batch_size)
    raw = cfg.get(P.MEMORY_STATS)
    if raw is None:
        return MemoryDecision(micro, checkpointing, None)
    refusal = check_plan(_stats(str(raw)), micro, checkpointing, batch_size,
                         budget_bytes(cfg, local, measure=measure),
                         reserved_bytes=resident_before_training(cfg, measure=measure))
    return MemoryDecision(micro, checkpointing, refusal)


def budget_bytes(cfg: Mapping[str, Any], local: LocalTask, *, measure: bool) -> int:
    """This client's memory budget in bytes: its profile's under the run's
    ``fleet.memory_budget_fraction``, capped by its cgroup's limit on a real device
    (``measure``: its container or unit may allow less than its profile says)."""
    budget = memory_budget_bytes(local.device, float(cfg.get(P.MEMORY_BUDGET_FRACTION, 0.0)))
    if measure:
        budget = min(budget, cgroup_memory_limit() or budget)
    return budget


def decide_program(cfg: Mapping[str, Any], local: LocalTask, program_bytes: int,
                   batch_size: int, *, measure: bool) -> MemoryDecision:
    """The admission test of a client training in ExecuTorch's runtime.

    The runtime's training memory is known exactly, not traced: ``program_bytes`` is the
    program's weights plus the mutable arena ExecuTorch's memory planner sized for its largest
    batch (activations, gradients; the arena does not shrink for smaller passes, so the
    plan's micro-batch only splits the work). It must fit the device's budget next to what
    the process already holds (:func:`resident_before_training`).
    """
    micro, _ = config_settings(cfg, batch_size)
    budget = budget_bytes(cfg, local, measure=measure)
    reserved = resident_before_training(cfg, measure=measure)
    if reserved + program_bytes <= budget:
        return MemoryDecision(micro, False, None)
    return MemoryDecision(micro, False, (
        f"the ExecuTorch training program needs {program_bytes} bytes next to {reserved} "
        f"already resident, over this device's budget of {budget} bytes"))


@functools.lru_cache(maxsize=8)
def _stats(raw: str) -> TrainingMemoryStats:
    """Parsed once per process: the JSON is the same in every round of a run."""
    try:
        return TrainingMemoryStats.from_dict(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{P.MEMORY_STATS}: not valid training-memory figures: {err}") from None


def measured_runtime(local: LocalTask) -> int | None:
    """Bytes this device's process holds ready to train: VmRSS once torch, the train path and
    the task's model are loaded (the coordinator reserves it in this device's memory plans;
    ``decide`` measures again before each training). None where /proc cannot be read."""
    prepare_device_process()
    from fleetfl.client import training  # noqa: F401 - what the first train message loads

    local.fresh_model()
    try:
        return rss_bytes()
    except (OSError, ValueError):
        return None
