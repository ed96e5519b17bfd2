"""The one module of fleetfl that touches ExecuTorch: lowering a training program to a ``.pte``
and running it in ExecuTorch's training runtime (what a phone runs).

ExecuTorch's training API is experimental and its loader is underscore-private
(``executorch.extension.training._load_for_executorch_for_training_from_buffer``), so fleetfl
pins ``executorch`` exactly (:data:`EXECUTORCH_VERSION`, the ``fleetfl[executorch]`` extra) and
every other module goes through the few names here. Checked against executorch 1.5.1 with
torch 2.13.0+cpu.

A known kernel bug is worked around at lowering: the portable CPU kernel of
``max_pool2d_with_indices_backward`` adds into its output without zeroing it first
(pytorch/executorch#21686, fixed upstream by #21878 after 1.5.1), so every Conv2d → MaxPool2d
model got corrupted gradients. :func:`lower_training_program` replaces that op with an exact
``scatter_add`` into zeros before lowering.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # require() runs in config checks, which load no torch
    import torch

EXECUTORCH_VERSION = "1.5.1"
INSTALL_HINT = "pip install 'fleetfl[executorch]'"
METHOD = "forward"


class ExecuTorchMissing(ImportError):
    """ExecuTorch is not installed, or not the pinned version."""


def require() -> None:
    """Raise :class:`ExecuTorchMissing` (with the install command) unless the pinned
    ExecuTorch is importable."""
    try:
        version = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        raise ExecuTorchMissing(
            f"the ExecuTorch runtime is not installed: {INSTALL_HINT}") from None
    if version != EXECUTORCH_VERSION:
        raise ExecuTorchMissing(f"fleetfl needs executorch=={EXECUTORCH_VERSION} (its training "
                                f"API is experimental), found {version}: {INSTALL_HINT}")


def _quiet_imports() -> None:
    # We chose the experimental API knowingly (pinned); its ExperimentalWarning on every load
    # would only repeat that to users.
    warnings.filterwarnings("ignore", message="This API is experimental", module="executorch")
    warnings.filterwarnings("ignore", message="This API is experimental", module=__name__)
    # torchao (an ExecuTorch dependency) logs a WARNING for each CUDA kernel library it cannot
    # load on a CPU-only machine, and torch's pytree one about torchao's enums: expected here
    # and not worth a user's attention.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Lowered:
    """A lowered training program: the ``.pte`` bytes and its planned memory."""

    buffer: bytes
    planned_bytes: int  # the mutable memory arena ExecuTorch's planner sized for the program


def lower_training_program(exported: torch.export.ExportedProgram) -> Lowered:
    """Joint forward-backward graph of ``exported`` (its first output is the loss), lowered to
    ExecuTorch's portable CPU kernels; raises whatever ExecuTorch raises on an unsupported op
    (the message names it)."""
    require()
    _quiet_imports()
    import torch
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    with warnings.catch_warnings():
        # ExecuTorch 1.5.1 trips torch 2.13's pytree deprecations (FutureWarning) and warns
        # that unused gradient outputs (e.g. the input's) have no out buffer (UserWarning).
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*kwarg value is None", category=UserWarning)
        joint = _export_forward_backward(exported)
        joint = joint.run_decompositions({
            torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_backward,
        })
        program = to_edge(joint).to_executorch()
    plan = program.executorch_program.execution_plan[0]
    missing = sorted(missing_kernels(plan))
    if missing:
        raise UnsupportedOperator(
            f"ExecuTorch {EXECUTORCH_VERSION}'s CPU runtime has no kernel for "
            f"{', '.join(missing)}, which this model's training program uses")
    # The planner's arenas (entry 0 is reserved and 0): what the runtime allocates to run it.
    arena = int(sum(plan.non_const_buffer_sizes))
    return Lowered(buffer=bytes(program.buffer), planned_bytes=arena)


class UnsupportedOperator(ValueError):
    """The program uses an operator the runtime cannot run (the message names it)."""


def missing_kernels(plan: Any) -> set[str]:
    """Operators (``aten::sort.values``) of an execution plan without a kernel registered in
    the runtime this Python package ships (the portable CPU kernels a phone build also has)."""
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    registered = set(_get_operator_names())
    used = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
    return used - registered


def _max_pool2d_backward(grad_output: torch.Tensor, inp: torch.Tensor, kernel_size: Any,
                         stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                         indices: torch.Tensor) -> torch.Tensor:
    """``max_pool2d_with_indices_backward`` as a scatter-add into zeros: ``indices`` are flat
    offsets into each (batch, channel) plane of ``inp``, as ATen's kernel reads them (the
    pooling geometry is already in them)."""
    n, c = inp.shape[0], inp.shape[1]
    plane = inp.new_zeros(n, c, inp.shape[2] * inp.shape[3])
    grad = plane.scatter_add(2, indices.flatten(2), grad_output.flatten(2))
    return grad.view(inp.shape)


class TrainingRuntime:
    """A ``.pte`` training program loaded in ExecuTorch's runtime.

    :meth:`forward_backward` runs the program once and keeps its gradients;
    :meth:`parameters` are the runtime's own weight tensors (writing into them sets the
    weights; the runtime has them only after a first :meth:`forward_backward`);
    :meth:`sgd` steps them with the runtime's SGD, ``w -= lr * g``.
    """

    def __init__(self, buffer: bytes) -> None:
        require()
        _quiet_imports()
        from executorch.extension.training import _load_for_executorch_for_training_from_buffer

        self._module = _load_for_executorch_for_training_from_buffer(buffer)

    def forward_backward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The program's user outputs (copies) for the flat ``inputs``."""
        return list(self._module.forward_backward(METHOD, list(inputs)))

    def parameters(self) -> dict[str, torch.Tensor]:
        """Name → the runtime's weight tensor (aliases the runtime's memory)."""
        return dict(self._module.named_parameters())

    def gradients(self) -> dict[str, torch.Tensor]:
        """Name → gradient of the last :meth:`forward_backward` (copies)."""
        return dict(self._module.named_gradients())

    def sgd(self, lr: float) -> Any:
        """ExecuTorch's SGD over :meth:`parameters` (no momentum, no weight decay);
        ``.step(named_gradients)`` updates the weights in place."""
        from executorch.extension.training import get_sgd_optimizer

        return get_sgd_optimizer(self._module.named_parameters(), lr)
