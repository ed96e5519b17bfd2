"""Models for the federated tasks, and their per-sample compute cost in FLOPs."""

from __future__ import annotations

import math

import torch
from torch import nn

from fleetfl.tasks.randwire import RandWire

MODEL_NAMES: tuple[str, ...] = ("logreg", "cnn", "randwire")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one Linear layer on the flattened input.

    Input float32 of shape ``(batch, *input_shape)`` with ``prod(input_shape) ==
    in_features``; output logits of shape ``(batch, num_classes)`` (apply softmax /
    cross-entropy outside).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 digit images.

    Conv(1->16, 3x3, pad 1) - ReLU - Conv(16->32, 3x3, pad 1) - ReLU - MaxPool(2) - Flatten -
    Linear(32*4*4=512 -> 64) - ReLU - Linear(64 -> num_classes). Only plain layers, so the
    model can be pruned, fake-quantized and exported to ONNX/TFLite unchanged.

    Input float32 ``(batch, in_channels, height, width)``; output logits ``(batch,
    num_classes)``. Height and width must be >= 2 (odd sizes are floored by the pooling).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, height: int = 8, width: int = 8
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (height // 2) * (width // 2), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _construct(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Instantiate model ``name`` (parameters drawn from the current torch RNG)."""
    if name == "logreg":
        return LogisticRegression(math.prod(input_shape), num_classes)
    # name in ("cnn", "randwire")
    if len(input_shape) != 3 or input_shape[1] < 2 or input_shape[2] < 2:
        raise ValueError(
            f"model {name!r} needs an image input_shape (channels, height, width) with "
            f"height, width >= 2, like (1, 8, 8); got {input_shape}"
        )
    channels, height, width = input_shape
    if name == "randwire":
        return RandWire(num_classes, channels)
    return DigitsCNN(num_classes, channels, height, width)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build model ``name`` in ``MODEL_NAMES`` with initial weights determined by ``seed``.

    The global torch RNG is forked, so building a model leaves it unchanged.

    Raises:
        ValueError: unknown ``name``, empty ``input_shape``, ``num_classes < 2`` or, for
            "cnn" or "randwire", a non-image ``input_shape``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    # devices=[]: CPU-only fork; the models are built on CPU and moved by the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(name, input_shape, num_classes)


def forward_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...],
                             input_dtype: str = "float32") -> int:
    """Forward-pass FLOPs for one sample, as ``torch.utils.flop_counter.FlopCounterMode``
    counts them on a zero batch of shape ``(1, *input_shape)`` and dtype ``input_dtype``.

    It counts the matrix products and convolutions (2 FLOPs per multiply-accumulate, padded
    positions included) at the operator level, so any module built from them is covered; the
    elementwise work (biases, activations, norms, pooling) is not, being small next to them.
    oneDNN is switched off for the count: its fused CPU kernels (the LSTM's, for one) have no
    FLOP formula, while the plain kernels they replace are matmuls the counter sees.
    """
    import warnings

    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    dummy = torch.zeros((1, *input_shape), dtype=getattr(torch, input_dtype),
                        device=param.device if param is not None else "cpu")
    was_training = model.training
    try:
        model.eval()  # no dropout / batch-norm statistic updates from the dummy batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oneDNN's flag setter warns about Intel GPUs
            with (torch.no_grad(), torch.backends.mkldnn.flags(enabled=False),
                  FlopCounterMode(display=False) as counter):
                model(dummy)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def training_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...],
                              input_dtype: str = "float32") -> int:
    """Training FLOPs for one sample (forward + backward) = 3 x forward FLOPs.

    The backward pass costs about twice the forward pass (gradients with respect to both
    activations and weights, one matmul each), the usual rule of thumb behind the "6N FLOPs
    per token" estimate (2N forward + 4N backward) of Kaplan et al. 2020, "Scaling Laws for
    Neural Language Models". Optimizer updates are not included.
    """
    return 3 * forward_flops_per_sample(model, input_shape, input_dtype)
