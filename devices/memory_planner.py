"""Training-memory planning: predict one local training step's peak and make it fit a budget.

A step holds the weights, the gradients, the optimizer state (FedProx's anchor copy of the
weights), the activations saved for backward and transient workspace; the last two grow with
the batch. :class:`TrainingMemoryStats` carries those figures for one model, measured once by
``fleetfl.devices.memory_stats.training_memory_stats`` (torch) and plain numbers afterwards,
so the coordinator can plan without torch. All sizes are bytes.

``fit_training_plan`` keeps the batch size the coordinator asked for (the learning dynamics
stay the same) and makes it fit by, in this order: running it as is; splitting it into
micro-batches with gradient accumulation (no extra compute); activation checkpointing (one
extra forward pass); and finally micro-batches smaller than ``min_micro_batch``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fleetfl.devices._checks import check_int, check_real
from fleetfl.devices.profiles import DeviceProfile

MIB = 2**20

# Memory the first training step of a fresh process takes beyond its tensors: kernel code paged
# in, oneDNN's generated kernels, thread-pool stacks. Measured at 22-26 MiB for torch 2.13 CPU on
# x86-64 (benchmarks/memory_planner.py, fleet part); kept as a margin on every plan.
DEFAULT_SLACK_BYTES = 32 * MIB

# What a client process holds before it trains: Python, Flower, torch, fleetfl, the model and its
# data. On x86-64 with torch 2.13 CPU a device process measured 253-265 MiB (VmRSS once its data
# and model are loaded, benchmarks/memory_planner.py) and a simulated client's process, which
# also loads scikit-learn, about 330 MiB; 320 MiB is above the former, so that plans made with it
# hold on such devices. The coordinator reserves it in every plan unless told otherwise
# (``fleet.runtime_memory_mib``); a real device measures its own.
DEFAULT_RUNTIME_BYTES = 320 * MIB

# Keys of a memory plan in a fit config, next to WorkPlan's ``plan.*`` keys.
CONFIG_KEYS: Mapping[str, str] = {
    "micro_batch": "plan.micro-batch",
    "checkpointing": "plan.checkpointing",
    "predicted_peak_bytes": "plan.predicted-peak-bytes",
    "budget_bytes": "plan.budget-bytes",
}


@dataclass(frozen=True)
class ActivationCost:
    """Batch-dependent bytes of a step, ``fixed + per_sample * samples`` for each part."""

    saved_fixed: float  # activations kept for backward
    saved_per_sample: float
    workspace_fixed: float  # everything else live at the peak: batch, logits, grad buffers
    workspace_per_sample: float
    grads_at_peak: int  # gradient bytes already allocated when a single step peaks

    def saved(self, samples: int) -> int:
        return max(0, round(self.saved_fixed + self.saved_per_sample * samples))

    def workspace(self, samples: int) -> int:
        return max(0, round(self.workspace_fixed + self.workspace_per_sample * samples))


@dataclass(frozen=True)
class TrainingMemoryStats:
    """One model's training-memory figures; ``checkpointed`` is None without checkpointing."""

    weight_bytes: int  # parameters and buffers
    grad_bytes: int  # one gradient per trainable parameter
    optimizer_state_bytes: int
    update_workspace_bytes: int  # temporaries of the parameter update, after backward
    plain: ActivationCost
    checkpointed: ActivationCost | None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable numbers."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingMemoryStats:
        ckpt = d.get("checkpointed")
        return cls(
            **{k: int(d[k]) for k in ("weight_bytes", "grad_bytes", "optimizer_state_bytes",
                                      "update_workspace_bytes")},
            plain=ActivationCost(**d["plain"]),
            checkpointed=None if ckpt is None else ActivationCost(**ckpt),
        )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak of one training step, by part (bytes)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations \
            + self.workspace


@dataclass(frozen=True)
class MemoryPlan:
    """How one client runs its batches inside its budget, and why."""

    batch_size: int
    micro_batch: int  # samples per forward/backward pass
    accumulation_steps: int  # passes per optimizer step: ceil(batch_size / micro_batch)
    checkpointing: bool
    predicted_peak_bytes: int  # including reserved and slack bytes
    budget_bytes: int
    breakdown: MemoryBreakdown
    fits: bool
    reason: str

    def to_config(self) -> dict[str, int | bool]:
        """Flat fit-config keys: ``plan.micro-batch``, ``plan.checkpointing``, ..."""
        return {
            CONFIG_KEYS["micro_batch"]: self.micro_batch,
            CONFIG_KEYS["checkpointing"]: self.checkpointing,
            CONFIG_KEYS["predicted_peak_bytes"]: self.predicted_peak_bytes,
            CONFIG_KEYS["budget_bytes"]: self.budget_bytes,
        }


def memory_budget_bytes(profile: DeviceProfile, fraction: float = 0.0) -> int:
    """Bytes the whole client process may hold on ``profile``'s device.

    ``fraction`` 0 means the profile's own ``memory_budget_bytes`` (50 % of RAM on headless
    boards, 25 % on phones: see ``fleetfl.devices.profiles``); a fraction in (0, 1] overrides
    that with the same share of every device's RAM.
    """
    fraction = check_real("fraction", fraction, minimum=0.0)
    if fraction > 1:
        raise ValueError(f"fraction: must be in [0, 1], got {fraction!r}")
    if fraction == 0:
        return profile.memory_budget_bytes
    return math.floor(fraction * profile.ram_bytes)


def config_settings(cfg: Mapping[str, object], batch_size: int) -> tuple[int, bool]:
    """``(micro_batch, checkpointing)`` from a fit config carrying ``MemoryPlan.to_config()``
    keys; without them, the whole batch in one pass and no checkpointing."""
    micro = cfg.get(CONFIG_KEYS["micro_batch"], batch_size)
    checkpointing = cfg.get(CONFIG_KEYS["checkpointing"], False)
    micro = check_int(CONFIG_KEYS["micro_batch"], micro, minimum=1)
    if not isinstance(checkpointing, bool):
        raise ValueError(f"{CONFIG_KEYS['checkpointing']}: must be a bool, got {checkpointing!r}")
    return min(micro, batch_size), checkpointing


def predict_peak(
    stats: TrainingMemoryStats, micro_batch: int, accumulation_steps: int, checkpointing: bool
) -> MemoryBreakdown:
    """Peak bytes of a step running ``accumulation_steps`` passes of ``micro_batch`` samples.

    With accumulation, the gradients of earlier passes are live during the later ones, so all
    of them count; a single pass peaks before its last gradients exist. The parameter update
    (after backward) peaks at gradients, optimizer state and its own temporaries.

    Raises:
        ValueError: ``checkpointing`` for a model without a checkpointed variant.
    """
    micro_batch = check_int("micro_batch", micro_batch, minimum=1)
    accumulation_steps = check_int("accumulation_steps", accumulation_steps, minimum=1)
    cost = stats.checkpointed if checkpointing else stats.plain
    if cost is None:
        raise ValueError("this model does not support activation checkpointing")
    grads = stats.grad_bytes if accumulation_steps > 1 else cost.grads_at_peak
    step = MemoryBreakdown(stats.weight_bytes, grads, stats.optimizer_state_bytes,
                           cost.saved(micro_batch), cost.workspace(micro_batch))
    update = MemoryBreakdown(stats.weight_bytes, stats.grad_bytes, stats.optimizer_state_bytes,
                             0, stats.update_workspace_bytes)
    return step if step.total >= update.total else update


def fit_training_plan(
    stats_or_model: TrainingMemoryStats | Any,
    batch_size: int,
    budget_bytes: int,
    *,
    input_shape: tuple[int, ...] | None = None,
    reserved_bytes: int = 0,
    slack_bytes: int = DEFAULT_SLACK_BYTES,
    min_micro_batch: int = 8,
) -> MemoryPlan:
    """The cheapest way to train batches of ``batch_size`` within ``budget_bytes``.

    ``stats_or_model`` is a :class:`TrainingMemoryStats` or a torch model (then
    ``input_shape``, one sample's shape, is required and the stats are measured).
    ``reserved_bytes`` is memory the step cannot use: the process's own resident memory
    before training (Python, torch, model, data), when the budget covers the whole process.
    ``slack_bytes`` is kept free for what tensors do not show (``DEFAULT_SLACK_BYTES``).
    Returns a plan with ``fits=False`` and the reason when even one sample with every saving
    does not fit.
    """
    stats = _as_stats(stats_or_model, input_shape)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    budget_bytes = check_int("budget_bytes", budget_bytes, minimum=0)
    reserved_bytes = check_int("reserved_bytes", reserved_bytes, minimum=0) \
        + check_int("slack_bytes", slack_bytes, minimum=0)
    floor = min(min_micro_batch, batch_size)
    modes = [False] + ([True] if stats.checkpointed is not None else [])
    # Each stage's candidates from the largest micro-batch down; the first that fits wins.
    stages = [(c, m) for c in modes for m in _micro_batches(batch_size) if m >= floor]
    stages += [(c, m) for c in modes for m in _micro_batches(batch_size) if m < floor]
    full = _plan(stats, batch_size, batch_size, False, budget_bytes, reserved_bytes)
    for checkpointing, micro in stages:
        plan = _plan(stats, batch_size, micro, checkpointing, budget_bytes, reserved_bytes)
        if plan.fits:
            return _explained(plan, full)
    smallest = _plan(stats, batch_size, 1, modes[-1], budget_bytes, reserved_bytes)
    b = smallest.breakdown
    how = " with activation checkpointing" if smallest.checkpointing else ""
    reason = (
        f"no plan fits the budget of {budget_bytes} bytes: even one sample per pass{how} needs "
        f"{smallest.predicted_peak_bytes} bytes (weights {b.weights}, gradients {b.gradients}, "
        f"optimizer state {b.optimizer_state}, activations {b.activations}, workspace "
        f"{b.workspace}, reserved and slack {reserved_bytes})"
    )
    return MemoryPlan(**{**asdict(smallest), "breakdown": b, "reason": reason})


def check_plan(
    stats: TrainingMemoryStats,
    micro_batch: int,
    checkpointing: bool,
    batch_size: int,
    budget_bytes: int,
    *,
    reserved_bytes: int = 0,
    slack_bytes: int = DEFAULT_SLACK_BYTES,
) -> str | None:
    """None when the plan fits ``budget_bytes`` on this device, else why not (for the client
    to refuse the work with). ``reserved_bytes``: the client's resident memory now."""
    if checkpointing and stats.checkpointed is None:
        return "the plan asks for activation checkpointing, which this model does not support"
    plan = _plan(stats, batch_size, min(micro_batch, batch_size), checkpointing, budget_bytes,
                 reserved_bytes + slack_bytes)
    if plan.fits:
        return None
    return (f"the plan (batch {batch_size} in passes of {plan.micro_batch}"
            f"{', checkpointed' if checkpointing else ''}) needs {plan.predicted_peak_bytes} "
            f"bytes ({plan.breakdown.total} for the training step, {reserved_bytes} already "
            f"resident, {slack_bytes} slack), over this device's budget of {budget_bytes} bytes")


def _as_stats(stats_or_model: Any, input_shape: tuple[int, ...] | None) -> TrainingMemoryStats:
    if isinstance(stats_or_model, TrainingMemoryStats):
        return stats_or_model
    if input_shape is None:
        raise ValueError("input_shape is required to measure a model's training memory")
    from fleetfl.devices.memory_stats import training_memory_stats

    return training_memory_stats(stats_or_model, input_shape)


def _micro_batches(batch_size: int) -> list[int]:
    """Distinct pass sizes ``ceil(batch_size / k)`` for k = 1, 2, ..., largest first."""
    return sorted({math.ceil(batch_size / k) for k in range(1, batch_size + 1)}, reverse=True)


def _plan(
    stats: TrainingMemoryStats, batch: int, micro: int, checkpointing: bool, budget: int,
    reserved: int,
) -> MemoryPlan:
    steps = math.ceil(batch / micro)
    breakdown = predict_peak(stats, micro, steps, checkpointing)
    peak = breakdown.total + reserved
    return MemoryPlan(batch, micro, steps, checkpointing, peak, budget, breakdown,
                      peak <= budget, "")


def _explained(plan: MemoryPlan, full: MemoryPlan) -> MemoryPlan:
    """``plan`` with a one-line reason naming what it changed and what the batch would need."""
    if plan.micro_batch == plan.batch_size and not plan.checkpointing:
        reason = f"batch {plan.batch_size} fits as is"
    else:
        parts = []
        if plan.accumulation_steps > 1:
            parts.append(f"{plan.accumulation_steps} passes of up to {plan.micro_batch} samples "
                         "with gradient accumulation")
        if plan.checkpointing:
            parts.append("activation checkpointing")
        reason = (f"batch {plan.batch_size} as {' and '.join(parts)}: the whole batch at once "
                  f"would need {full.predicted_peak_bytes} bytes")
    reason += f" (predicted peak {plan.predicted_peak_bytes} of {plan.budget_bytes} bytes)"
    return MemoryPlan(**{**asdict(plan), "breakdown": plan.breakdown, "reason": reason})
