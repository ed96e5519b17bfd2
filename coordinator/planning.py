"""Per-round cohort selection and per-client work plans (pure: no Flower, no I/O).

Each round, every registered client is online with its device's availability; the coordinator
samples ``clients_per_round`` of the online ones. A fraction ``stragglers`` of the cohort gets a
uniformly drawn smaller number of epochs in [1, E) (the FedProx paper's systems-heterogeneity
setup); with a deadline, every client gets what its device can finish in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetfl.coordinator.registry import ClientInfo
from fleetfl.devices.clock import transfer_time_s
from fleetfl.devices.fleet import available_clients
from fleetfl.devices.workplan import WorkPlan, plan_work, sample_stragglers


@dataclass(frozen=True)
class PlanSettings:
    """The knobs of cohort planning, from ``[federation]`` and ``[fleet]``."""

    clients_per_round: int
    local_epochs: int
    batch_size: int
    stragglers: float
    deadline_s: float | None
    seed: int


_SELECTION, _STRAGGLERS = 0, 1  # independent random streams of one round


def round_rng(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """A reproducible RNG for one kind of draw (``stream``) in one round."""
    return np.random.default_rng([seed, server_round, stream])


def select_cohort(
    clients: Sequence[ClientInfo], server_round: int, settings: PlanSettings
) -> list[ClientInfo]:
    """Sample up to ``clients_per_round`` clients among those online this round."""
    online = available_clients([c.device for c in clients], server_round, settings.seed)
    k = min(settings.clients_per_round, len(online))
    rng = round_rng(settings.seed, server_round, _SELECTION)
    picks = rng.choice(online, size=k, replace=False)
    return [clients[i] for i in sorted(int(p) for p in picks)]


def plan_cohort(
    cohort: Sequence[ClientInfo],
    server_round: int,
    settings: PlanSettings,
    *,
    flops_per_sample: float,
    downlink_bytes: int,
    uplink_bytes: int,
) -> dict[int, WorkPlan]:
    """One :class:`WorkPlan` per cohort member, keyed by node id.

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
        plans[client.node_id] = plan_work(
            client.device,
            local_epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            num_examples=client.num_examples,
            flops_per_sample=flops_per_sample,
            deadline_s=settings.deadline_s,
            transfer_s=transfer,
            straggler_epochs=s_epochs,
        )
    return plans
