"""Which runtime a client trains in (torch or ExecuTorch), and its loaded training program.

* A **real device** says so itself: ``node_config["runtime"]`` (``fleetfl client start
  --runtime executorch``), with ``node_config["program"]`` the ``.pte`` written by ``fleetfl
  export --format executorch-train`` (without it the device exports its task's program once).
* A **simulated client** trains in ExecuTorch when its device profile is mapped to it by
  ``fleet.runtimes`` (e.g. ``{phone-mid = "executorch"}``), so one simulation mixes phones
  running ExecuTorch with boards running torch.

A process loads each program once (a simulation worker serves many clients of the same task;
a device serves every round) and keeps it in :data:`_RUNNERS`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fleetfl.client.local import DATA_PATH, LocalTask

if TYPE_CHECKING:
    from fleetfl.client.solver_executorch import ProgramRunner

TORCH, EXECUTORCH = "torch", "executorch"
RUNTIMES = (TORCH, EXECUTORCH)
RUNTIME = "runtime"  # node_config key of a real device
PROGRAM = "program"  # node_config key: the device's .pte training program
FLEET_RUNTIMES = "fleet.runtimes"  # message config key: JSON {profile: runtime}

_RUNNERS: dict[tuple[Any, ...], ProgramRunner] = {}
_LOCK = threading.Lock()


def runtime_of(cfg: Mapping[str, Any], node_config: Mapping[str, Any], local: LocalTask) -> str:
    """``"torch"`` or ``"executorch"`` for this client (``ValueError`` on an unknown name)."""
    if DATA_PATH in node_config:
        name = str(node_config.get(RUNTIME, TORCH))
    else:
        raw = cfg.get(FLEET_RUNTIMES, "{}")
        mapping = json.loads(raw) if isinstance(raw, str) else dict(raw)
        name = str(mapping.get(local.device.name, TORCH))
    if name not in RUNTIMES:
        raise ValueError(f"unknown training runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    return name


def runner_for(local: LocalTask, node_config: Mapping[str, Any]) -> ProgramRunner:
    """This client's training program, loaded in ExecuTorch's runtime (once per process)."""
    path = node_config.get(PROGRAM)
    key: tuple[Any, ...]
    if path:
        stat = os.stat(str(path))
        key = ("file", str(path), stat.st_mtime_ns, stat.st_size)
    else:
        key = ("task", id(local.task), local.input_shape, str(local.x.dtype))
    with _LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = _load(local, None if not path else str(path))
    return runner


def _load(local: LocalTask, path: str | None) -> ProgramRunner:
    from fleetfl.client.solver_executorch import ProgramRunner
    from fleetfl.client.training_program import build_training_program, load_program

    model = local.fresh_model()
    if path is not None:
        program = load_program(path)
    else:  # the export traces the model's parameters; their values are not changed
        program = build_training_program(local.task, model, (local.x[:8], local.y[:8]))
    if list(program.manifest.input_shape) != list(local.input_shape):
        raise ValueError(f"training program {path} takes examples of shape "
                         f"{tuple(program.manifest.input_shape)}, this device's data has "
                         f"{local.input_shape}")
    runner = ProgramRunner(program)
    runner.check_model({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return runner
