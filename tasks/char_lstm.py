"""A character-level LSTM language model (LEAF's Shakespeare model, and smaller ones)."""

from __future__ import annotations

import torch
from torch import nn


class CharLSTM(nn.Module):
    """Embedding → LSTM (``layers`` × ``hidden``) → Linear on the last step.

    Input: symbol ids of shape ``(batch, seq_len)``, any integer dtype (uint8 from
    :mod:`fleetfl.tasks.shakespeare`, int64 from a device's ``.npz``); output: next-symbol
    logits, float32 ``(batch, classes)`` (``classes`` defaults to ``vocab``: the next symbol).
    """

    def __init__(self, vocab: int, *, embed: int, hidden: int, layers: int,
                 classes: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes or vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])
