"""The FedProx local solver on ExecuTorch's training runtime: the same objective, mini-batches
and SGD as :func:`fleetfl.client.solver.fedprox_train`, run by a ``.pte`` training program
(:mod:`fleetfl.client.training_program`) the way a phone runs it.

One step, for a batch B of the plan (``batch_indices``, identical to the torch solver's):

* split B into passes of at most ``min(micro_batch, max_batch)`` examples; pass j with share
  s_j = |B_j|/|B| runs the program with ``scale = s_j`` and ``μ · s_j``, so the gradients of
  the passes add up to ∇[L_B(w ⊙ m) + μ/2·||w − wᵗ||²];
* ``w ← w − lr · g`` with the runtime's SGD.

Pruned weights stay exactly zero: the program's masks zero their gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fleetfl.client.executorch_api import TrainingRuntime
from fleetfl.client.solver import SolverResult, batch_indices
from fleetfl.client.training_program import PREFIX, TrainingProgram, flat_inputs


class ProgramRunner:
    """A training program loaded in ExecuTorch's runtime, with its weights readable and
    writable as numpy arrays keyed by the model's ``state_dict`` names."""

    def __init__(self, program: TrainingProgram) -> None:
        self.program = program
        self.manifest = program.manifest
        self.runtime = TrainingRuntime(program.buffer)
        self._params: dict[str, torch.Tensor] | None = None

    def params(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The runtime's weight tensors by model name; the runtime exposes them only after a
        first run, so one throwaway ``forward_backward`` on an example of ``(x, y)`` does it."""
        if self._params is None:
            ones = [torch.ones(self._shape(n)) for n in self.manifest.masked]
            zeros = [torch.zeros(s) for _, s in self.manifest.parameters]
            self.runtime.forward_backward(flat_inputs(x[:1], y[:1], 1.0, 0.0, ones, zeros))
            self._params = {k.removeprefix(PREFIX): v for k, v in self.runtime.parameters().items()}
        return self._params

    def _shape(self, name: str) -> list[int]:
        return dict(self.manifest.parameters)[name]

    def check_model(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """``ValueError`` unless the program trains exactly these parameters (name → shape)."""
        mine = {n: tuple(s) for n, s in self.manifest.parameters}
        if mine != {n: tuple(s) for n, s in shapes.items()}:
            missing = sorted(set(shapes) ^ set(mine)) or sorted(
                n for n in shapes if tuple(shapes[n]) != mine.get(n))
            raise ValueError(f"the training program does not match the task's model "
                             f"(parameters differ: {', '.join(missing[:5])})")


def fedprox_train_executorch(
    runner: ProgramRunner,
    weights: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mu: float,
    lr: float,
    batch_size: int,
    steps: int,
    seed: int,
    micro_batch: int | None = None,
) -> tuple[SolverResult, dict[str, np.ndarray]]:
    """Run ``steps`` FedProx SGD steps from ``weights`` (the global model, the anchor) in the
    ExecuTorch runtime; return what was done and the trained weights (float32 copies).

    ``masks``: name → 0/1 array for the pruned parameters (absent names are dense).
    """
    n = len(y)
    if n == 0 or steps <= 0:
        return SolverResult(steps=0, samples=0, mean_loss=float("nan")), dict(weights)
    manifest = runner.manifest
    params = runner.params(x, y)
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)))
    anchors = [params[name].clone() for name, _ in manifest.parameters]
    mask_list = [_mask(masks, name, params[name]) for name in manifest.masked]
    passes = min(micro_batch or manifest.max_batch, manifest.max_batch)
    sgd = runner.runtime.sgd(lr)
    losses, samples, done = [], 0, 0
    for idx in batch_indices(n, batch_size, steps, seed):
        grads, loss = _batch_gradients(runner, x, y, idx, passes, mu, mask_list, anchors)
        sgd.step(grads)
        losses.append(loss)
        samples += len(idx)
        done += 1
    trained = {name: t.detach().numpy().copy() for name, t in params.items()}
    return SolverResult(steps=done, samples=samples, mean_loss=float(np.mean(losses))), trained


def _mask(masks: Mapping[str, np.ndarray], name: str, like: torch.Tensor) -> torch.Tensor:
    mask = masks.get(name)
    if mask is None:
        return torch.ones_like(like)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)).reshape(like.shape)


def _batch_gradients(runner: ProgramRunner, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                     passes: int, mu: float, masks: list[torch.Tensor],
                     anchors: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """The batch's gradient (by runtime name) and mean task loss, in passes of ``passes``."""
    total: dict[str, torch.Tensor] = {}
    loss = 0.0
    for start in range(0, len(idx), passes):
        part = idx[start : start + passes]
        share = len(part) / len(idx)
        out = runner.runtime.forward_backward(
            flat_inputs(x[part], y[part], share, mu * share, masks, anchors))
        loss += float(out[1]) * share
        for name, grad in runner.runtime.gradients().items():
            total[name] = grad if name not in total else total[name] + grad
    return total, loss
