"""Quantization-aware training (fake-quant) for a plain ``nn.Module``, state_dict unchanged.

During local training the weights of every Conv/Linear layer are fake-quantized per output
channel (symmetric, zero point 0, on the grid [-64, 64] that our int8 ONNX export gives them:
see *Weight grid* below) and the inputs of those layers plus the model output are fake-quantized
per tensor (asymmetric int8, [-128, 127]) with ranges observed on the training batches.
Gradients pass with the straight-through estimator. The global model stays float: only
``forward`` changes, so ``state_dict()`` keys, ``parameters()`` and FL aggregation are exactly as
without QAT, and a post-training full-int8 export (``export_onnx``/``export_tflite``) meets
weights that already sit well on the int8 grid.

Why not ``torch.ao.quantization.prepare_qat``: it swaps modules for ``torch.ao.nn.qat`` classes and
adds observer/fake-quant buffers (56 extra state_dict keys on the digits CNN), which would change
the tensors the clients exchange. We use the same fake-quant kernels
(``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine``) through an instance-level
``forward`` override and a forward hook instead, which leave the state_dict untouched.

**Weight grid.** The int8 ONNX export (:mod:`fleetfl.compression.export_onnx`) stores int8
weights in [-64, 64] (onnxruntime's ``reduce_range``, 129 levels), because onnxruntime's x86
kernels without VNNI multiply u8 activations by s8 weights with ``VPMADDUBSW``, which saturates a
pair of products at int16 unless ``|w_i| + |w_{i+1}| <= 128``; with full-range weights the same
file computed logits off by 0.6 on average on such a CPU, against 0.03 on a VNNI/AMX CPU.
QAT trains on that exported grid, so the fake-quant forward is the deployed model's.
TFLite's full-range int8 weights (``export_tflite``) hold this grid's values to within half of
their own finer step.

Activations are fake-quantized where a fused int8 kernel sees them: at the input of each weight
layer (after ReLU/pooling/flatten, which keep values on the grid) and at the model output.
Ops done with functionals between layers (e.g. ``x + y``) are not re-quantized on their own.

Usage (client side, around local training)::

    handle = enable_qat(model)
    try:
        fedprox_train(model, ...)
    finally:
        handle.remove()

or ``with enable_qat(model): ...``. Copies made while QAT is enabled keep fake-quant; remove
it first.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Symmetric int8 weights, zero point 0, on the 7-bit grid of the ONNX export (module docstring).
WEIGHT_QMIN, WEIGHT_QMAX = -64, 64
ACT_QMIN, ACT_QMAX = -128, 127  # asymmetric int8 activations
_MIN_SCALE = 1e-8  # guards all-zero tensors (e.g. a fully pruned channel)
QAT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_OBSERVER_ATTR = "_fleetfl_qat_input"


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel (axis 0) symmetric int8 fake-quant of ``weight`` on [-64, 64], STE.

    The scale of channel c is ``max|w_c| / WEIGHT_QMAX`` (64); it is recomputed from the current
    weights each call and not differentiated (as a per-channel min/max observer would).
    """
    w = weight.detach()
    amax = torch.linalg.vector_norm(w.reshape(len(w), -1), ord=float("inf"), dim=1)
    scale = (amax * (1.0 / WEIGHT_QMAX)).clamp_min_(_MIN_SCALE).float()
    zero_point = torch.zeros(len(w), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(
        weight, scale, zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
    )


@dataclass
class RangeObserver:
    """Per-tensor activation range (an exponential moving average of batch min/max).

    ``momentum`` is the weight of the newest batch; the first batch sets the range. The range
    always contains 0 so that zero (padding, ReLU) is exactly representable.
    """

    momentum: float = 0.1
    low: float | None = None
    high: float | None = None

    def observe(self, x: torch.Tensor) -> None:
        """Fold the min/max of ``x`` into the range."""
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if self.low is None or self.high is None:
            self.low, self.high = lo, hi
        else:
            self.low += self.momentum * (lo - self.low)
            self.high += self.momentum * (hi - self.high)

    def fake_quant(self, x: torch.Tensor, *, update: bool) -> torch.Tensor:
        """Fake-quantize ``x`` with the observed range (observed first if ``update``).

        Before anything was observed, ``x`` passes unchanged.
        """
        if update:
            self.observe(x)
        if self.low is None or self.high is None:
            return x
        low, high = min(self.low, 0.0), max(self.high, 0.0)
        scale = max((high - low) / (ACT_QMAX - ACT_QMIN), _MIN_SCALE)
        zero_point = min(max(round(ACT_QMIN - low / scale), ACT_QMIN), ACT_QMAX)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)


def _qat_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a Conv/Linear layer with fake-quantized input and weight."""
    observer: RangeObserver = getattr(self, _OBSERVER_ATTR)
    x = observer.fake_quant(x, update=self.training)
    weight = fake_quant_weight(self.weight)
    if isinstance(self, nn.Linear):
        return F.linear(x, weight, self.bias)
    return self._conv_forward(x, weight, self.bias)  # type: ignore[operator]


@dataclass
class QATHandle:
    """Fake-quant installed on a model by :func:`enable_qat`; ``remove()`` undoes it."""

    model: nn.Module
    layers: dict[str, nn.Module]
    output: RangeObserver
    _hook: torch.utils.hooks.RemovableHandle | None = field(default=None, repr=False)

    def activation_ranges(self) -> dict[str, tuple[float, float]]:
        """Observed (low, high) per fake-quantized tensor: ``"<layer>:input"`` and ``"output"``."""
        ranges: dict[str, tuple[float, float]] = {}
        for name, layer in self.layers.items():
            obs: RangeObserver = getattr(layer, _OBSERVER_ATTR)
            if obs.low is not None and obs.high is not None:
                ranges[f"{name}:input"] = (obs.low, obs.high)
        if self.output.low is not None and self.output.high is not None:
            ranges["output"] = (self.output.low, self.output.high)
        return ranges

    def set_activation_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Fix activation ranges, keyed as :meth:`activation_ranges` returns them.

        E.g. an exported int8 model's own grids, ``(q_min - zero_point) * scale`` to
        ``(q_max - zero_point) * scale``, so that the fake-quant forward computes what that
        model computes. Raises ``KeyError`` for a key that names no fake-quantized tensor.
        """
        for key, (low, high) in ranges.items():
            if key == "output":
                observer = self.output
            elif key.endswith(":input") and key[: -len(":input")] in self.layers:
                observer = getattr(self.layers[key[: -len(":input")]], _OBSERVER_ATTR)
            else:
                raise KeyError(f"no fake-quantized tensor {key!r}")
            observer.low, observer.high = float(low), float(high)

    def remove(self) -> None:
        """Restore the plain float forward of every layer. Idempotent."""
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(_OBSERVER_ATTR, None)
        self.layers = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> QATHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def enable_qat(model: nn.Module, *, momentum: float = 0.1) -> QATHandle:
    """Install int8 fake-quant on ``model`` in place and return the handle that removes it.

    Every ``nn.Linear``/``nn.Conv1d/2d/3d`` gets a fake-quantized weight (per output channel,
    symmetric) and input (per tensor, observed range); the model output is fake-quantized too.
    Ranges are observed while the model (or layer) is in training mode and frozen in eval mode.

    Args:
        model: the model; its state_dict keys and parameters are left unchanged.
        momentum: weight of each new batch in the activation ranges' moving average.

    Raises:
        ValueError: QAT (or another instance-level ``forward`` override) is already installed
            on one of the layers, or ``momentum`` is not in (0, 1].
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QAT_LAYERS)}
    for name, layer in layers.items():
        if "forward" in layer.__dict__:
            raise ValueError(f"layer {name!r} already has its forward overridden (QAT enabled?)")
    for layer in layers.values():
        # Plain attributes in the instance __dict__: not parameters or buffers, so the
        # state_dict is unchanged; a bound method so that deepcopy rebinds it to the copy.
        layer.__dict__[_OBSERVER_ATTR] = RangeObserver(momentum)
        layer.__dict__["forward"] = types.MethodType(_qat_forward, layer)
    output = RangeObserver(momentum)

    def quantize_output(module: nn.Module, _inputs: object, out: object) -> object:
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return output.fake_quant(out, update=module.training)
        return out

    handle = QATHandle(model=model, layers=layers, output=output)
    handle._hook = model.register_forward_hook(quantize_output)
    return handle
