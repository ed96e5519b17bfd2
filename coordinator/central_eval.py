"""What the coordinator itself may evaluate the global model on, in simulation and deployed.

* **Simulation**: the task's federated dataset is generated here anyway, so the global model is
  evaluated on its central test set (``accuracy``, ``loss`` and the task's other metrics) and on
  the union of the clients' training splits (``train_loss``).
* **Deployed**: the coordinator holds no client data. It evaluates only on what the task's
  ``central_test()`` gives (none by default), and learns the model's input from the task's
  ``input_shape``/``num_classes`` (or that test set). Without either, federated evaluation
  (``federation.evaluate_every``) is the only measure; ``accuracy``/``loss`` of a round then
  come from it (``evaluation = "federated"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fleetfl.coordinator.config import Config, ConfigError
from fleetfl.coordinator.preflight import check_task
from fleetfl.tasks.data import Split
from fleetfl.tasks.task import Task, evaluate_task


@dataclass(frozen=True)
class EvaluationSets:
    """The coordinator's own evaluation data (``None``: it has none)."""

    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: str  # numpy dtype name of the model's input (float32, or token ids)
    test: Split | None
    train: Split | None  # simulation only: the union of the clients' training splits
    sizes: tuple[int, ...] | None = None  # simulation only: each client's training examples

    def evaluate(self, task: Task, model: nn.Module) -> dict[str, Any]:
        """Row fields of the central evaluation: ``accuracy``, ``loss``, ``train_loss``, the
        task's other metrics, and ``evaluation`` (``central`` or ``none``)."""
        row: dict[str, Any] = {"accuracy": math.nan, "loss": math.nan, "train_loss": math.nan,
                               "evaluation": "none"}
        if self.test is not None:
            row.update(_evaluate(task, model, self.test), evaluation="central")
        if self.train is not None:
            row["train_loss"] = _evaluate(task, model, self.train)["loss"]
        return row


def evaluation_sets(config: Config, task: Task, model: nn.Module,
                    deployed: bool) -> EvaluationSets:
    """The sets, after the task's start-up checks (``ConfigError`` naming the key)."""
    if not deployed:
        fed = config.federation
        key = "federation.data_partitions" if fed.data_partitions else "federation.num_clients"
        try:
            data = task.federated_data(fed.partitions, config.task.seed)
        except ValueError as err:  # e.g. too few examples for that many clients
            raise ConfigError(key, f"task {task.name!r} cannot make {fed.partitions} clients' "
                                   f"data partitions: {err}") from None
        except OSError as err:  # its data could not be read or fetched
            raise ConfigError("task.name", f"task {task.name!r} cannot load its data: "
                                           f"{err}") from None
        if data.num_clients != fed.partitions:  # client i trains on partition i mod P
            raise ConfigError(key, f"task {task.name!r} made {data.num_clients} clients' data "
                                   f"partitions when asked for {fed.partitions}")
        example = data.clients[0][0].x[:2]
        check_task(config, task, model, example)
        return EvaluationSets(data.input_shape, data.num_classes, str(example.dtype), data.test,
                              data.train_union(), tuple(len(tr.y) for tr, _ in data.clients))
    test = task.central_test()
    shape = task.input_shape or (tuple(test.x.shape[1:]) if test is not None else None)
    classes = task.num_classes or (int(test.y.max()) + 1 if test is not None else None)
    if shape is None or classes is None:
        raise ConfigError("task.name", f"the deployed coordinator holds no client data: task "
                                       f"{task.name!r} must set input_shape and num_classes "
                                       f"(or give a central_test())")
    dtype = str(test.x.dtype) if test is not None else task.input_dtype
    check_task(config, task, model, np.zeros((2, *shape), dtype))
    return EvaluationSets(tuple(shape), int(classes), dtype, test, None)


def _evaluate(task: Task, model: nn.Module, split: Split) -> dict[str, float]:
    return evaluate_task(task, model, torch.from_numpy(split.x), torch.from_numpy(split.y))
