"""Evaluating a classifier on a dataset: mean cross-entropy loss and accuracy."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, accuracy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss_sum += float(loss_fn(logits, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(y), 1)
    return loss_sum / n, correct / n
