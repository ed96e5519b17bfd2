"""Global-model checkpoints: an atomic, ``weights_only``-loadable file per saved round.

A checkpoint is one ``torch.save``'d dict::

    {"format": "fleetfl-checkpoint", "version": 1, "server_round": int,
     "state_dict": {name: Tensor}, "task": {...}, "masks": {name: bool Tensor} | None,
     "quantization": {...}, "strategy_state": {...} | None}

Only tensors and plain Python values (str, int, float, bool, None, lists, tuples, str-keyed
dicts) are stored, so :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``,
which refuses to run arbitrary pickled code. NumPy arrays are stored as tensors and come back
as NumPy arrays (masks and strategy state).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.registry import task_from_record

FORMAT = "fleetfl-checkpoint"
VERSION = 1
# Keys of the task record needed to rebuild the model: "name" (and "params") as in [task], or,
# in checkpoints written before the Task API, "dataset" and "model" (task_from_record).
REQUIRED_TASK_KEYS = ("input_shape", "num_classes")
DEFAULT_NUM_CLIENTS = 20  # federation.num_clients's default; only the partition depends on it


class CheckpointError(ValueError):
    """A file that is not a readable fleetfl checkpoint of a supported version."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the file layout).

    Attributes:
        state_dict: the global model's float tensors, by state_dict name.
        task: the resolved ``[task]`` section plus ``input_shape``, ``num_classes`` and,
            when saved by the coordinator, ``num_clients``.
        server_round: the round after which the model was saved (0 = initial model).
        masks: pruning masks (bool arrays shaped like their tensors) by state_dict name.
        quantization: quantization settings/parameters of the run (plain values).
        strategy_state: the server strategy's state for resuming, or None.
        path: where it was loaded from.
    """

    state_dict: dict[str, torch.Tensor]
    task: dict[str, Any]
    server_round: int
    masks: dict[str, np.ndarray] | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    strategy_state: dict[str, Any] | None = None
    path: Path | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 8, 8)``."""
        return tuple(int(d) for d in self.task["input_shape"])

    @property
    def input_dtype(self) -> str:
        """numpy dtype name of the model's input (``float32``; token ids: ``uint8``...)."""
        return str(self.task.get("input_dtype", "float32"))

    def build_model(self) -> nn.Module:
        """The global model in eval mode: the task's ``build_model`` + weights, masks applied."""
        try:
            task = task_from_record(self.task)
        except ValueError as err:
            raise CheckpointError(f"{self._where()}: cannot rebuild its task: {err}") from None
        model = task.build_model(int(self.task.get("seed", 0)))
        state = apply_masks(self.state_dict, self.masks)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{self._where()}: weights do not fit the model of task "
                                  f"{task.name!r}: {err}") from None
        return model.eval()

    def load_dataset(self) -> FederatedDataset:
        """The task's federated dataset, rebuilt from the task config (same seed, same split)."""
        return load_task_dataset(self.task)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "checkpoint"


def load_task_dataset(task: dict[str, Any]) -> FederatedDataset:
    """The federated dataset a task record describes (same seed and clients, same split)."""
    return task_from_record(task).federated_data(
        int(task.get("num_clients", DEFAULT_NUM_CLIENTS)), int(task.get("seed", 0)))


def apply_masks(
    state_dict: dict[str, torch.Tensor], masks: dict[str, np.ndarray] | None
) -> dict[str, torch.Tensor]:
    """``state_dict`` with each masked tensor multiplied by its 0/1 mask (a new dict)."""
    if not masks:
        return dict(state_dict)
    out = dict(state_dict)
    for name, mask in masks.items():
        if name not in out:
            raise CheckpointError(f"mask for unknown tensor {name!r}")
        if tuple(mask.shape) != tuple(out[name].shape):
            raise CheckpointError(f"mask {name!r} has shape {tuple(mask.shape)}, "
                                  f"tensor has {tuple(out[name].shape)}")
        out[name] = out[name] * torch.as_tensor(np.asarray(mask, dtype=bool), dtype=out[name].dtype)
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | dict[str, np.ndarray],
    task: dict[str, Any],
    server_round: int,
    masks: dict[str, np.ndarray] | None = None,
    quantization: dict[str, Any] | None = None,
    strategy_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same directory + ``os.replace``).

    A reader never sees a half-written file, and a crash leaves the previous checkpoint intact.

    Args:
        path: destination file (conventionally ``*.pt``); parent directories are created.
        state_dict: the global model's tensors (torch or NumPy), by state_dict name.
        task: resolved ``[task]`` section plus ``input_shape`` and ``num_classes`` (and
            ``num_clients`` so that the dataset partition can be rebuilt).
        server_round: the round just finished (0 for the initial model).
        masks: pruning masks by state_dict name, or None for a dense model.
        quantization: quantization settings/parameters (plain values), default ``{}``.
        strategy_state: server strategy state for resuming (plain values / arrays), or None.

    Returns:
        The path written.

    Raises:
        TypeError: a value that ``torch.load(weights_only=True)`` could not read back
            (names its key path).
        ValueError: ``task`` lacks one of ``REQUIRED_TASK_KEYS``.
    """
    missing = [k for k in REQUIRED_TASK_KEYS if k not in task]
    missing += [] if "name" in task or "dataset" in task else ["name"]
    if missing:
        raise ValueError(f"task is missing {', '.join(missing)} (needed to rebuild the model)")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "server_round": int(server_round),
        "state_dict": {k: torch.as_tensor(v).detach().cpu().clone() for k, v in state_dict.items()},
        "task": _plain(task, "task"),
        "masks": None if masks is None else {
            k: torch.from_numpy(np.asarray(m, dtype=bool).copy()) for k, m in masks.items()},
        "quantization": _plain(quantization or {}, "quantization"),
        "strategy_state": None if strategy_state is None else _plain(strategy_state,
                                                                     "strategy_state"),
    }
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (os.replace is atomic within one file system);
    # open(..., "xb") rather than mkstemp so the file gets the usual umask permissions.
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, not a (safe) torch file, not a fleetfl checkpoint,
            an unsupported version or missing fields; the message names the file.
    """
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such checkpoint file")
    size = src.stat().st_size
    try:
        raw = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or unsafe files
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{src}: truncated, corrupt or not a fleetfl checkpoint "
                              f"({size} bytes; torch.load with weights_only=True failed: "
                              f"{why})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{src}: not a fleetfl checkpoint (format field is "
                              f"{raw.get('format') if isinstance(raw, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    version = raw.get("version")
    if version != VERSION:
        raise CheckpointError(f"{src}: checkpoint version {version!r} is not supported "
                              f"(this fleetfl reads version {VERSION})")
    for key in ("state_dict", "task", "server_round"):
        if key not in raw:
            raise CheckpointError(f"{src}: checkpoint has no {key!r}")
    missing = [k for k in REQUIRED_TASK_KEYS if k not in raw["task"]]
    missing += [] if "name" in raw["task"] or "dataset" in raw["task"] else ["name"]
    if missing:
        raise CheckpointError(f"{src}: task config lacks {', '.join(missing)}")
    masks = raw.get("masks")
    strategy_state = raw.get("strategy_state")
    return Checkpoint(
        state_dict=dict(raw["state_dict"]),
        task=dict(raw["task"]),
        server_round=int(raw["server_round"]),
        masks=None if masks is None else {k: v.numpy() for k, v in masks.items()},
        quantization=dict(raw.get("quantization") or {}),
        strategy_state=None if strategy_state is None else _to_numpy(strategy_state),
        path=src,
    )


def _plain(value: Any, where: str) -> Any:
    """``value`` with NumPy arrays/scalars turned into tensors/Python scalars; else TypeError."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str, got {type(k).__name__}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a checkpoint "
                    "(use tensors, NumPy arrays or plain Python values)")


def _to_numpy(value: Any) -> Any:
    """Tensors back to NumPy arrays, recursively (for strategy state)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list | tuple):
        return type(value)(_to_numpy(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value
