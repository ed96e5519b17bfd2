"""A task's **training program**: the FedProx objective and its backward pass, exported from the
task's model to an ExecuTorch ``.pte`` that a phone's training runtime runs.

The program computes, for a batch ``(x, y)``, parameters ``w``, pruning masks ``m`` (1 = kept),
the global model ``a`` (the FedProx anchor w^t), a loss scale ``s`` and the proximal weight μ::

    objective = s · L(f(x; w ⊙ m), y) + μ/2 · Σ_i ||w_i − a_i||²      (squared L2)

and returns ``(objective, L)`` plus ∂objective/∂w for every parameter (ExecuTorch's joint
graph). The masks are inputs, not weights: a pruned weight gets zero gradient through ``w ⊙ m``
and zero proximal gradient (it is 0 in both ``w`` and ``a``), so SGD keeps it at exactly zero
without a separate masking step. ``s`` lets a batch run in passes whose gradients add up
(``s`` = the pass's share of the batch, μ scaled by the same share).

Flat input order of the program (what a phone passes): ``x, y, s, μ``, then one mask per name
of :attr:`ProgramManifest.masked`, then one anchor per name of :attr:`ProgramManifest.parameters`.
The manifest (JSON, next to the ``.pte``) records those orders and the shapes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fleetfl.client import executorch_api as et
from fleetfl.tasks.task import Task

PROGRAM_FORMAT = 1
DEFAULT_MAX_BATCH = 256
PREFIX = "model."  # the runtime names parameters by their path inside ProximalObjective


class ProgramExportError(ValueError):
    """The task's model cannot be exported as a training program (the message says where)."""


class ProximalObjective(nn.Module):
    """The exported module: ``forward(x, y, scale, mu, masks, anchors) -> (objective, loss)``
    as in the module docstring; ``masks`` follow ``masked``, ``anchors`` the model's
    ``named_parameters()`` order."""

    def __init__(self, model: nn.Module, task: Task, masked: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.masked = list(masked)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, mu: torch.Tensor,
                masks: list[torch.Tensor], anchors: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        params = dict(self.model.named_parameters())
        masked = {name: params[name] * m for name, m in zip(self.masked, masks, strict=True)}
        logits = torch.func.functional_call(self.model, masked, (x,), strict=False)
        loss = self.task.loss(logits, y)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params.values(), anchors, strict=True))
        return scale * loss + 0.5 * mu * prox, loss.detach()


@dataclass(frozen=True)
class ProgramManifest:
    """What a runtime needs to drive a ``.pte`` training program (JSON beside the file)."""

    format: int
    parameters: list[tuple[str, list[int]]]  # (name, shape), the anchors' input order
    masked: list[str]  # names of the masked (prunable) parameters, the masks' input order
    input_shape: list[int]  # one example
    input_dtype: str  # numpy dtype name of x
    max_batch: int  # largest batch one forward_backward takes (memory is planned for it)
    planned_bytes: int  # ExecuTorch's planned mutable arena for max_batch (activations, grads)
    task: dict[str, Any]  # {"name": ..., "params": {...}}: the task it was exported from

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ProgramManifest:
        """Parse :meth:`to_dict`'s form; ``ValueError`` on another format or missing keys."""
        if raw.get("format") != PROGRAM_FORMAT:
            raise ValueError(f"training program format {raw.get('format')!r}, this fleetfl "
                             f"reads format {PROGRAM_FORMAT}")
        try:
            params = [(str(n), [int(d) for d in s]) for n, s in raw["parameters"]]
            return cls(format=PROGRAM_FORMAT, parameters=params,
                       masked=[str(n) for n in raw["masked"]],
                       input_shape=[int(d) for d in raw["input_shape"]],
                       input_dtype=str(raw["input_dtype"]), max_batch=int(raw["max_batch"]),
                       planned_bytes=int(raw["planned_bytes"]), task=dict(raw["task"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a training program manifest: {err!r}") from None


@dataclass(frozen=True)
class TrainingProgram:
    """A ``.pte`` training program and its manifest."""

    buffer: bytes
    manifest: ProgramManifest


def build_training_program(task: Task, model: nn.Module, example: tuple[np.ndarray, np.ndarray],
                           *, max_batch: int = DEFAULT_MAX_BATCH,
                           task_ref: dict[str, Any] | None = None) -> TrainingProgram:
    """Export ``model``'s FedProx training program for batches of 1..``max_batch`` examples,
    then check it: one step in ExecuTorch's runtime on ``example`` (a few ``(x, y)`` of the
    task's data) must give torch autograd's gradients.

    Raises :class:`ProgramExportError` naming the stage (export, lowering: the message names
    the op) or the parameters whose gradients disagree; ``ExecuTorchMissing`` without the extra.
    """
    et.require()
    if max_batch < 2:  # torch.export specializes a dimension of size 1: no dynamic batch
        raise ProgramExportError(f"max_batch must be >= 2, got {max_batch}")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ProgramExportError(f"the model has buffers ({', '.join(buffers[:3])}...): the "
                                 "ExecuTorch training program trains parameters only (no "
                                 "BatchNorm running statistics)")
    params = dict(model.named_parameters())
    masked = [name for name in task.prunable(model) if name in params]
    objective = ProximalObjective(model, task, masked).train()
    x, y = _example(example, max_batch)
    inputs = _inputs(x, y, 1.0, 0.0, [torch.ones_like(params[n]) for n in masked],
                     [p.detach().clone() for p in params.values()])
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = ({0: batch}, {0: batch}, None, None, [None] * len(masked), [None] * len(params))
    try:
        with warnings.catch_warnings():
            # An LSTM's flat weight list is re-assigned when its parameters are swapped for
            # the masked ones; torch.export warns, and the program's gradients are checked.
            warnings.filterwarnings("ignore", message=".*assigned during export")
            exported = torch.export.export(objective, inputs, dynamic_shapes=dynamic,
                                           strict=False)
    except Exception as err:  # torch.export raises many types; all mean "not exportable"
        raise ProgramExportError(f"torch.export of the training objective failed: "
                                 f"{_first_line(err)}") from err
    try:
        lowered = et.lower_training_program(exported)
    except et.ExecuTorchMissing:
        raise
    except et.UnsupportedOperator as err:
        raise ProgramExportError(str(err)) from None
    except Exception as err:
        raise ProgramExportError(f"lowering to ExecuTorch failed: {_first_line(err)}") from err
    manifest = ProgramManifest(
        format=PROGRAM_FORMAT, parameters=[(n, list(p.shape)) for n, p in params.items()],
        masked=masked, input_shape=list(x.shape[1:]), input_dtype=str(example[0].dtype),
        max_batch=max_batch, planned_bytes=lowered.planned_bytes,
        task=task_ref or {"name": task.name, "params": {}})
    program = TrainingProgram(lowered.buffer, manifest)
    check_gradients(program, objective, x, y)
    return program


def _example(example: tuple[np.ndarray, np.ndarray], max_batch: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The example batch as tensors, 2..``max_batch`` rows (a batch of one would make
    torch.export fix the batch size; one example is repeated)."""
    x, y = np.ascontiguousarray(example[0][:max_batch]), np.asarray(example[1][:max_batch])
    if len(y) == 0:
        raise ProgramExportError("no example to trace the training program with")
    if len(y) == 1:
        x, y = np.concatenate([x, x]), np.concatenate([y, y])
    return torch.from_numpy(x), torch.from_numpy(y)


def _inputs(x: torch.Tensor, y: torch.Tensor, scale: float, mu: float,
            masks: list[torch.Tensor], anchors: list[torch.Tensor]) -> tuple[Any, ...]:
    return (x, y, torch.tensor(scale), torch.tensor(mu), masks, anchors)


def flat_inputs(x: torch.Tensor, y: torch.Tensor, scale: float, mu: float,
                masks: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]
                ) -> list[torch.Tensor]:
    """The program's flat input list (the order of the module docstring)."""
    return [x, y, torch.tensor(scale), torch.tensor(mu), *masks, *anchors]


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:400]


def check_gradients(program: TrainingProgram, objective: ProximalObjective, x: torch.Tensor,
                    y: torch.Tensor, rtol: float = 1e-3) -> None:
    """One ``forward_backward`` in ExecuTorch vs torch autograd on the same objective, with a
    random mask and a perturbed anchor (so every term contributes); ``ProgramExportError``
    names the parameters whose gradients differ by more than ``rtol`` of their largest entry."""
    gen = torch.Generator().manual_seed(0)
    params = dict(objective.model.named_parameters())
    masks = [(torch.rand(params[n].shape, generator=gen) > 0.3).float() for n in objective.masked]
    anchors = [p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for p in params.values()]
    try:
        runtime = et.TrainingRuntime(program.buffer)
        runtime.forward_backward(flat_inputs(x, y, 1.0, 0.5, masks, anchors))
        with torch.no_grad():
            for name, weight in runtime.parameters().items():
                weight.copy_(params[name.removeprefix(PREFIX)])
        runtime.forward_backward(flat_inputs(x, y, 1.0, 0.5, masks, anchors))
    except RuntimeError as err:
        raise ProgramExportError(f"the training program fails in ExecuTorch's runtime: "
                                 f"{_first_line(err)}") from None
    got = runtime.gradients()
    objective.zero_grad()
    objective(x, y, torch.tensor(1.0), torch.tensor(0.5), masks, anchors)[0].backward()
    bad = []
    for name, p in params.items():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = float(ref.abs().max()) or 1.0
        if float((got[PREFIX + name] - ref).abs().max()) > rtol * scale + 1e-6:
            bad.append(name)
    objective.zero_grad()
    if bad:
        raise ProgramExportError(
            f"the ExecuTorch program's gradients differ from torch's for {', '.join(bad)}: an "
            f"ExecuTorch kernel of this model computes them wrongly (executorch=="
            f"{et.EXECUTORCH_VERSION}); train this task with the torch runtime")


def save_program(program: TrainingProgram, path: str | Path) -> Path:
    """Write ``path`` (the ``.pte``) and ``path`` + ``.json`` (the manifest); returns the
    manifest's path."""
    path = Path(path)
    path.write_bytes(program.buffer)
    manifest = path.with_name(path.name + ".json")
    manifest.write_text(json.dumps(program.manifest.to_dict(), indent=2))
    return manifest


def load_program(path: str | Path) -> TrainingProgram:
    """Read a ``.pte`` and its ``.json`` manifest (``ValueError`` naming what is wrong)."""
    path = Path(path)
    manifest_path = path.with_name(path.name + ".json")
    try:
        buffer = path.read_bytes()
        raw = json.loads(manifest_path.read_text())
    except OSError as err:
        raise ValueError(f"training program {err.filename}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path}: not JSON: {err}") from None
    return TrainingProgram(buffer, ProgramManifest.from_dict(raw))
