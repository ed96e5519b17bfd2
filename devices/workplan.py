"""Per-client work plans: how much local training the coordinator asks of each device.

A plan travels inside the Flower fit config as flat keys (``plan.epochs`` ...), so the client
can rebuild it with ``WorkPlan.from_config`` without knowing how it was chosen. A plan may carry
a :class:`~fleetfl.devices.memory_planner.MemoryPlan` (how its batches fit the device's memory);
its keys (``plan.micro-batch`` ...) travel alongside and are read with
``fleetfl.devices.memory_planner.config_settings``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fleetfl.devices._checks import check_int, check_real
from fleetfl.devices.memory_planner import MemoryPlan
from fleetfl.devices.profiles import DeviceProfile

# WorkPlan attribute -> flat fit-config key.
CONFIG_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "epochs": "plan.epochs",
        "max_samples": "plan.max-samples",
        "batch_size": "plan.batch-size",
        "straggler": "plan.straggler",
    }
)


@dataclass(frozen=True)
class WorkPlan:
    """Local work for one client in one round."""

    epochs: float  # local epochs to run; may be fractional
    max_samples: int  # cap on samples processed this round, 0 = no cap
    batch_size: int  # samples per local SGD step
    straggler: bool  # True when the plan is less than the full local_epochs
    memory: MemoryPlan | None = None  # micro-batches/checkpointing that fit the device, if planned

    def __post_init__(self) -> None:
        # Normalise NumPy scalars to Python numbers so to_config() suits any serialiser.
        epochs = check_real("epochs", self.epochs, minimum=0.0, inclusive=False)
        object.__setattr__(self, "epochs", epochs)
        max_samples = check_int("max_samples", self.max_samples, minimum=0)
        object.__setattr__(self, "max_samples", max_samples)
        batch_size = check_int("batch_size", self.batch_size, minimum=1)
        object.__setattr__(self, "batch_size", batch_size)
        if not isinstance(self.straggler, bool | np.bool_):
            raise ValueError(f"straggler: must be a bool, got {self.straggler!r}")
        object.__setattr__(self, "straggler", bool(self.straggler))

    def steps_for(self, num_examples: int) -> int:
        """Local SGD steps on ``num_examples`` local samples.

        ``ceil(epochs * num_examples / batch_size)`` (a last partial batch is a step), capped at
        ``max_samples // batch_size`` when there is a cap, and never below 1.
        """
        num_examples = check_int("num_examples", num_examples, minimum=1)
        steps = math.ceil(_planned_samples(self.epochs, num_examples) / self.batch_size)
        if self.max_samples > 0:
            steps = min(steps, self.max_samples // self.batch_size)
        return max(steps, 1)

    def to_config(self) -> dict[str, int | float | bool]:
        """Flat, Flower-config-friendly keys: ``plan.epochs``, ``plan.max-samples``, ... and
        the memory plan's (``plan.micro-batch``, ...) when there is one."""
        return {
            CONFIG_KEYS["epochs"]: self.epochs,
            CONFIG_KEYS["max_samples"]: self.max_samples,
            CONFIG_KEYS["batch_size"]: self.batch_size,
            CONFIG_KEYS["straggler"]: self.straggler,
            **(self.memory.to_config() if self.memory is not None else {}),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> WorkPlan:
        """Rebuild a plan from a fit config; keys other than the four ``plan.*`` are ignored
        (the memory plan's included: ``memory_planner.config_settings`` reads those).

        ValueError names a missing key, or a key whose value has the wrong type or range.
        """
        missing = [key for key in CONFIG_KEYS.values() if key not in cfg]
        if missing:
            raise ValueError(f"work plan config: missing key(s) {', '.join(missing)}")
        key = CONFIG_KEYS["straggler"]
        if not isinstance(cfg[key], bool | np.bool_):
            raise ValueError(f"{key}: must be a bool, got {cfg[key]!r}")
        return cls(
            epochs=check_real(
                CONFIG_KEYS["epochs"], cfg[CONFIG_KEYS["epochs"]], minimum=0.0, inclusive=False
            ),
            max_samples=check_int(
                CONFIG_KEYS["max_samples"], cfg[CONFIG_KEYS["max_samples"]], minimum=0
            ),
            batch_size=check_int(
                CONFIG_KEYS["batch_size"], cfg[CONFIG_KEYS["batch_size"]], minimum=1
            ),
            straggler=bool(cfg[key]),
        )


def _planned_samples(epochs: float, num_examples: int) -> float:
    """``epochs * num_examples``, snapped to an integer when float rounding is all that differs.

    Without the snap, 0.1 epochs of 30 examples is 3.0000000000000004 samples, and a ceil()
    downstream would add a whole extra step.
    """
    samples = epochs * num_examples
    nearest = round(samples)
    return float(nearest) if math.isclose(samples, nearest, rel_tol=1e-9) else samples


def _affordable_samples(
    profile: DeviceProfile, flops_per_sample: float, deadline_s: float, transfer_s: float
) -> int:
    """Most samples whose compute time plus ``transfer_s`` fits in ``deadline_s`` (seconds)."""
    budget_s = deadline_s - transfer_s
    if budget_s <= 0:
        return 0
    samples = math.floor(budget_s * profile.train_flops_per_s / flops_per_sample)

    def late(n: int) -> bool:
        return n * flops_per_sample / profile.train_flops_per_s + transfer_s > deadline_s

    # Floating-point rounding may leave the floor a sample over the deadline; step back if so.
    while samples > 0 and late(samples):
        samples -= 1
    return samples


def plan_work(
    profile: DeviceProfile,
    *,
    local_epochs: int,
    batch_size: int,
    num_examples: int,
    flops_per_sample: float,
    deadline_s: float | None,
    transfer_s: float,
    straggler_epochs: float | None = None,
) -> WorkPlan:
    """The plan for one client, in the spirit of FedProx's partial work (Li et al., 2020).

    The full plan is ``local_epochs`` epochs. ``straggler_epochs`` (FedProx's systems-
    heterogeneity experiment draws it in [1, E) for a fraction of clients) replaces that and
    marks the client a straggler. With a deadline, the device gets as many samples as its
    throughput allows in ``deadline_s - transfer_s`` seconds; when that is less than the plan
    (its steps counted as full batches), ``max_samples`` caps the work and the client is a
    straggler. A device that cannot finish even
    one batch in time still gets one step (``max_samples = batch_size``, straggler): whether to
    select it is the coordinator's decision. ``flops_per_sample`` is training FLOP per sample
    (forward and backward); times are seconds.
    """
    local_epochs = check_int("local_epochs", local_epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_examples = check_int("num_examples", num_examples, minimum=1)
    flops_per_sample = check_real(
        "flops_per_sample", flops_per_sample, minimum=0.0, inclusive=False
    )
    transfer_s = check_real("transfer_s", transfer_s, minimum=0.0)
    if deadline_s is not None:
        deadline_s = check_real("deadline_s", deadline_s, minimum=0.0, inclusive=False)

    epochs: float = float(local_epochs)
    straggler = False
    if straggler_epochs is not None:
        epochs = check_real("straggler_epochs", straggler_epochs, minimum=0.0, inclusive=False)
        if epochs >= local_epochs:
            raise ValueError(
                f"straggler_epochs: must be below local_epochs={local_epochs}, got {epochs!r}"
            )
        straggler = True

    max_samples = 0
    if deadline_s is not None:
        affordable = _affordable_samples(profile, flops_per_sample, deadline_s, transfer_s)
        # Count every step as a full batch, so an uncapped plan meets the deadline however the
        # client fills its last batch.
        full_plan = WorkPlan(epochs, 0, batch_size, straggler).steps_for(num_examples)
        if affordable < full_plan * batch_size:
            max_samples = max(affordable, batch_size)
            straggler = True
    return WorkPlan(
        epochs=epochs, max_samples=max_samples, batch_size=batch_size, straggler=straggler
    )


def sample_stragglers(
    num_selected: int, fraction: float, local_epochs: int, rng: np.random.Generator
) -> list[float | None]:
    """Per selected client, an epoch count if it is a straggler this round, else None.

    As in FedProx's systems-heterogeneity experiments: exactly ``round(fraction *
    num_selected)`` positions (Python's ``round``, ties to even), chosen at random, get an
    integer number of epochs drawn uniformly from [1, local_epochs). With ``local_epochs == 1``
    there is no smaller whole number of epochs, so nobody is a straggler.
    """
    num_selected = check_int("num_selected", num_selected, minimum=0)
    fraction = check_real("fraction", fraction, minimum=0.0)
    if fraction > 1:
        raise ValueError(f"fraction: must be in [0, 1], got {fraction!r}")
    local_epochs = check_int("local_epochs", local_epochs, minimum=1)
    plan: list[float | None] = [None] * num_selected
    count = round(fraction * num_selected)
    if local_epochs == 1 or count == 0:
        return plan
    positions = rng.choice(num_selected, size=count, replace=False)
    epochs = rng.integers(1, local_epochs, size=count)
    for position, e in zip(positions, epochs, strict=True):
        plan[int(position)] = float(e)
    return plan
