"""Devices: profiles, fleets, the virtual clock and work planning."""

from fleetfl.devices.clock import (
    VirtualClock,
    client_round_time_s,
    compute_time_s,
    round_time_s,
    transfer_time_s,
)
from fleetfl.devices.fleet import (
    DEFAULT_MIX,
    available_clients,
    build_fleet,
    mix_counts,
    parse_mix,
)
from fleetfl.devices.profiles import CATALOG, DeviceProfile, get_profile
from fleetfl.devices.workplan import WorkPlan, plan_work, sample_stragglers

__all__ = [
    "CATALOG",
    "DEFAULT_MIX",
    "DeviceProfile",
    "VirtualClock",
    "WorkPlan",
    "available_clients",
    "build_fleet",
    "client_round_time_s",
    "compute_time_s",
    "get_profile",
    "mix_counts",
    "parse_mix",
    "plan_work",
    "round_time_s",
    "sample_stragglers",
    "transfer_time_s",
]
