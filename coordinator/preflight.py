"""Start-up checks of what a task's model can do, before any engine starts.

A feature that cannot apply to the user's model must stop the run at start-up with one error
naming the configuration key and the layer, never fail mid-run or be skipped silently:

* ``compression.qat``: fake-quant covers Linear and Conv layers (:mod:`fleetfl.compression.qat`).
  A recurrent or attention layer would train in float and deploy unquantized, so a model with
  one is refused.
* ``compression.prune_final_sparsity``: the task's ``prunable`` names must be float tensors of
  the model's ``state_dict`` (pruning zeroes them by magnitude).
* the model must accept the task's input: one forward pass on two examples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fleetfl.coordinator.config import Config, ConfigError

if TYPE_CHECKING:
    from fleetfl.tasks.task import Task

# Layers whose weights QAT does not fake-quantize (the rest of a model is activations).
NOT_QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.MultiheadAttention, nn.Bilinear)


def check_task(config: Config, task: Task, model: nn.Module, example: np.ndarray) -> None:
    """Raise :class:`ConfigError` naming the key (and layer) of the first feature that cannot
    apply to ``model``, or if it fails on ``example`` (a batch of the task's inputs)."""
    if config.compression.qat:
        for name, module in model.named_modules():
            if isinstance(module, NOT_QUANTIZABLE):
                raise ConfigError("compression.qat", f"layer {name!r} ({type(module).__name__}) "
                                  f"cannot be fake-quantized: QAT covers Linear and Conv layers; "
                                  f"set compression.qat = false for this task")
    if config.compression.prune_final_sparsity > 0:
        state = model.state_dict()
        for name in task.prunable(model):
            if name not in state or not state[name].is_floating_point():
                raise ConfigError("compression.prune_final_sparsity",
                                  f"task.prunable names {name!r}, not a float tensor of the "
                                  f"model's state_dict")
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(example))
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported
        raise ConfigError("task.name", f"the model of task {task.name!r} fails on its data "
                                       f"(shape {tuple(example.shape[1:])}): {err}") from None


def preflight(config: Config, *, deployed: bool = False) -> None:
    """Build the configured task and model once and run the start-up checks, on the task's
    data in simulation and, ``deployed``, on zeros of its ``input_shape`` (no client data)."""
    from fleetfl.coordinator.central_eval import evaluation_sets

    if not deployed:
        check_simulation(config)
    task = config.task.build()
    evaluation_sets(config, task, task.build_model(config.task.seed), deployed)


def check_simulation(config: Config) -> None:
    """What only a simulation on this machine needs: a simulated client fits a local Ray
    worker (``federation.client_cpus``) and some device of ``fleet.mix`` can hold the client
    runtime (``fleet.runtime_memory_mib``); else every round would hang or select nobody."""
    import os

    from fleetfl.devices.fleet import parse_mix
    from fleetfl.devices.memory_planner import memory_budget_bytes
    from fleetfl.devices.profiles import get_profile

    fed, fleet = config.federation, config.fleet
    cpus = os.cpu_count() or 1
    if not fed.ray_address and fed.client_cpus > cpus:
        raise ConfigError("federation.client_cpus", f"{fed.client_cpus:g} CPUs per client, but "
                                                    f"this machine has {cpus}: no simulated "
                                                    f"client could be scheduled")
    budgets = [memory_budget_bytes(get_profile(name), fleet.memory_budget_fraction)
               for name, weight in parse_mix(fleet.mix).items() if weight > 0]
    if fleet.runtime_memory_bytes >= max(budgets):
        raise ConfigError("fleet.runtime_memory_mib",
                          f"{fleet.runtime_memory_mib:g} MiB leaves no memory to train on any "
                          f"device of fleet.mix (largest budget {max(budgets) / 2**20:.0f} MiB)")


def _main() -> int:
    """``python -m fleetfl.coordinator.preflight`` < run config JSON: the deployed checks;
    exit 2 with ``{"key", "problem"}`` on stdout for a ConfigError."""
    import json
    import sys

    from fleetfl.coordinator.config import from_run_config

    try:
        preflight(from_run_config(json.loads(sys.stdin.read())), deployed=True)
    except ConfigError as err:
        print(json.dumps({"key": err.key, "problem": err.problem}))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
