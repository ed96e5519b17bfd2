"""Devices: profiles, fleets, the virtual clock, work planning, memory-aware scheduling and
training-memory planning. torch, onnx and the TFLite runtime are imported only inside the
functions that need them, so importing this package stays light."""

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
from fleetfl.devices.graph import OpGraph, from_onnx, from_tflite, from_torch
from fleetfl.devices.memory_planner import (
    MemoryPlan,
    TrainingMemoryStats,
    check_plan,
    fit_training_plan,
    predict_peak,
)
from fleetfl.devices.profiles import CATALOG, DeviceProfile, get_profile
from fleetfl.devices.scheduler import Schedule, optimal_schedule, peak_memory
from fleetfl.devices.workplan import WorkPlan, plan_work, sample_stragglers

__all__ = [
    "CATALOG",
    "DEFAULT_MIX",
    "DeviceProfile",
    "MemoryPlan",
    "OpGraph",
    "Schedule",
    "TrainingMemoryStats",
    "VirtualClock",
    "WorkPlan",
    "available_clients",
    "build_fleet",
    "check_plan",
    "client_round_time_s",
    "compute_time_s",
    "fit_training_plan",
    "from_onnx",
    "from_tflite",
    "from_torch",
    "get_profile",
    "mix_counts",
    "optimal_schedule",
    "parse_mix",
    "peak_memory",
    "plan_work",
    "predict_peak",
    "round_time_s",
    "sample_stragglers",
    "transfer_time_s",
]
