"""Structured (channel) pruning for export, with torch-pruning: a really smaller, faster model.

Unstructured masks (``compression/masks.py``) zero single weights: the exported file and the
on-device compute stay dense. Removing whole output channels of Conv/Linear layers (and the
matching input channels of the layers that consume them) shrinks every tensor and every matmul.
torch-pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) traces the
model once to find those coupled dimensions, so this works for any plain model, not just
``Sequential`` ones.

Channels are ranked by the L2 norm of their weights (``MagnitudeImportance(p=2)``), so channels
already zeroed by unstructured pruning go first. Channels coupled by additions (RandWire's
weighted sums) are removed together. The layer that produces the model output (logits) is never
pruned, nor are parameters used outside torch.nn layers (RandWire's aggregation weights, whose
dimension is a node's fan-in, not a channel).

Pruning without retraining costs some accuracy at high ratios; :func:`finetune` runs a few
epochs of SGD on calibration data (the clients' training union, or a device's local data) to
recover it, optionally under QAT fake-quant so that a following int8 export stays lossless.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fleetfl.compression.qat import enable_qat

PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The Conv/Linear layers whose output tensor *is* the model output (found with hooks)."""
    produced: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: produced.append((mod, out)))
             for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in hooks:
            h.remove()
    outputs = out if isinstance(out, tuple | list) else (out,)
    return [mod for mod, t in produced if any(t is o for o in outputs)]


def _free_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters used outside torch.nn layers (e.g. RandWire's aggregation weights).

    Their dimensions are not channels (a node's fan-in, say): they are left unpruned.
    """
    return [p for m in model.modules() if not type(m).__module__.startswith("torch.nn")
            for p in m.parameters(recurse=False)]


def structured_prune(model: nn.Module, example_input: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the output channels of each hidden layer removed.

    Args:
        model: float model (left unchanged; it must not have QAT enabled).
        example_input: one input batch, e.g. ``torch.zeros(1, *input_shape)``, used to trace
            the layer dependencies.
        ratio: fraction in [0, 1) of output channels/features removed per prunable layer
            (torch-pruning's ``pruning_ratio``); at least one channel always stays. The
            parameter count of a layer between two pruned layers drops by about
            ``1 - (1 - ratio)**2``.

    Returns:
        The pruned model (new parameters with fewer channels; in eval mode).

    Raises:
        ValueError: ``ratio`` outside [0, 1).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured pruning ratio must be in [0, 1), got {ratio}")
    pruned = copy.deepcopy(model).eval()
    if ratio == 0.0:
        return pruned
    try:
        import torch_pruning as tp
    except ImportError:
        raise ImportError("structured pruning needs torch-pruning: pip install "
                          "'torch-pruning>=1.6,<2'") from None
    free = _free_parameters(pruned)
    pruner = tp.pruner.MetaPruner(
        pruned,
        example_input,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        # Parameters listed in ignored_layers are never pruned.
        ignored_layers=[*_output_layers(pruned, example_input), *free],
        # Declared so that torch-pruning does not guess a channel dimension for them.
        unwrapped_parameters=[(p, p.dim() - 1) for p in free],
    )
    pruner.step()
    return pruned.eval()


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 3,
    lr: float = 0.05,
    batch_size: int = 32,
    seed: int = 0,
    qat: bool = False,
) -> float:
    """Plain SGD with momentum 0.9 on ``(x, y)`` for ``epochs`` epochs, in place.

    Args:
        qat: train under int8 fake-quant (:func:`fleetfl.compression.qat.enable_qat`), as the
            clients do, when the model will be exported to int8.

    Returns:
        Mean cross-entropy of the last epoch (nats).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    handle = enable_qat(model) if qat else None
    last = float("nan")
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            last = total / max(len(y), 1)
    finally:
        if handle is not None:
            handle.remove()
        model.eval()
    return last
