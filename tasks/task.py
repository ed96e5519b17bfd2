"""The public Task API: what a federation learns, as a model and federated data.

A user brings their own task by subclassing :class:`Task` and implementing two methods::

    class MyTask(fleetfl.Task):
        def build_model(self, seed: int) -> torch.nn.Module: ...
        def federated_data(self, num_clients: int, seed: int) -> fleetfl.FederatedDataset: ...

and naming it in the config: ``task.name = "my_package.my_module:MyTask"`` (imported from the
working directory or ``PYTHONPATH``), with ``[task.params]`` passed to it as keyword arguments.
Everything else has a default that a subclass may override:

* :meth:`loss`: cross-entropy on logits (mean over the batch);
* :meth:`metrics`: ``{"accuracy": ...}``;
* :meth:`load_local` / :meth:`load_local_test`: a device's own training and test data, the
  ``.npz`` format of :mod:`fleetfl.tasks.data_format`;
* :meth:`central_test`: an evaluation set the deployed coordinator may hold (none);
* :meth:`prunable`: which parameters magnitude pruning may zero (the weights of Linear, Conv
  and recurrent layers).

The built-in tasks (:mod:`fleetfl.tasks.builtin`: ``digits``, ``synthetic``) are written on
exactly this API. This module imports no torch at module level: a device answering a
``register`` query resolves its task without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fleetfl.tasks.data import FederatedDataset, Split

if TYPE_CHECKING:
    import torch
    from torch import nn


class Task:
    """Base class of every task. Subclasses implement :meth:`build_model` and
    :meth:`federated_data`; instances must be cheap to create and hold no large state (the
    simulation creates one per worker process)."""

    #: The name the task was resolved from (``"digits"``, ``"pkg.mod:Attr"``); set by
    #: :func:`fleetfl.tasks.registry.resolve_task`.
    name: str = ""
    #: Optional: the shape of one example and the number of classes. When set, a device checks
    #: its local data against them before it connects.
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    #: The numpy dtype of ``x`` (``"float32"``; a text task's token ids: ``"uint8"``,
    #: ``"int64"``...). Start-up traces (FLOPs, training memory) and the deployed coordinator's
    #: checks feed the model zeros of this dtype when no data is at hand.
    input_dtype: str = "float32"

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialized model; equal seeds must give equal weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model(seed)")

    def federated_data(self, num_clients: int, seed: int) -> FederatedDataset:
        """Per-client (train, test) splits for simulation, plus a central test set."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement federated_data(num_clients, seed)")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch, a scalar tensor (default: mean cross-entropy)."""
        import torch.nn.functional as F

        return F.cross_entropy(logits, y)

    def metrics(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Metrics of a batch, averaged by example count over batches (default: accuracy)."""
        return {"accuracy": float((logits.argmax(dim=1) == y).float().mean())}

    def load_local(self, path: str | Path) -> Split:
        """A device's own training data (default: the ``.npz`` format of ``data_format``)."""
        from fleetfl.tasks.data_format import as_input, load_npz

        data = load_npz(path)
        return Split(x=as_input(data.x, self.input_dtype, path), y=data.y)

    def load_local_test(self, path: str | Path) -> Split | None:
        """A device's own test split for federated evaluation (default: the ``.npz`` file's
        optional ``x_test``/``y_test``; ``None`` if it has none)."""
        from fleetfl.tasks.data_format import as_input, load_npz

        data = load_npz(path)
        if data.x_test is None or data.y_test is None:
            return None
        return Split(x=as_input(data.x_test, self.input_dtype, path, "x_test"), y=data.y_test)

    def central_test(self) -> Split | None:
        """An evaluation set the deployed coordinator may hold; ``None``: it holds no data."""
        return None

    def prunable(self, model: nn.Module) -> list[str]:
        """Names (``state_dict`` keys) of the parameters magnitude pruning may zero.

        Default: the weight matrices of Linear, Conv and recurrent (RNN, LSTM, GRU) layers;
        biases, norms and embeddings are kept dense.
        """
        from torch import nn

        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase)
        names = []
        for prefix, module in model.named_modules():
            if isinstance(module, kinds):
                for pname, param in module.named_parameters(recurse=False):
                    if pname.startswith("weight") and param.dim() >= 2:
                        names.append(f"{prefix}.{pname}" if prefix else pname)
        return names


def evaluate_task(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int = 1024) -> dict[str, float]:
    """``{"loss": ..., **task.metrics}`` of ``model`` on ``(x, y)``, example-weighted means.

    The model is put in eval mode; no gradients. An empty set gives NaN for every value.
    """
    import torch

    model.eval()
    totals: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)
            values = {"loss": float(task.loss(logits, yb)), **task.metrics(logits, yb)}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value * len(yb)
    if len(y) == 0:
        return {"loss": math.nan, **dict.fromkeys(totals, math.nan)}
    return {key: value / len(y) for key, value in totals.items()}


def describe(task: Task, params: Mapping[str, object]) -> str:
    """``name(key=value, ...)`` for logs and titles."""
    args = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return f"{task.name or type(task).__name__}({args})"
