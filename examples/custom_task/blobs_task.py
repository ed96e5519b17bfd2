"""A complete user task, outside the fleetfl package: your own model and your own data.

Run it from this directory (``task.name`` is imported from the working directory):

    fleetfl simulate --config fleet.toml --out runs/blobs

``BlobsTask`` learns 5 classes of noisy points in ``dim`` dimensions with a small MLP. Each
client sees a label-skewed share of the classes (Dirichlet ``skew``), as devices do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fleetfl

NUM_CLASSES = 5


class BlobsTask(fleetfl.Task):
    """Gaussian blobs and an MLP; ``[task.params]`` are this constructor's arguments."""

    def __init__(self, dim: int = 16, hidden: int = 32, skew: float = 0.5) -> None:
        if dim < 1 or hidden < 1 or skew <= 0:
            raise ValueError("dim and hidden must be >= 1 and skew > 0")
        self.dim, self.hidden, self.skew = dim, hidden, skew
        self.input_shape, self.num_classes = (dim,), NUM_CLASSES  # devices check their data

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, NUM_CLASSES))

    def federated_data(self, num_clients: int, seed: int) -> fleetfl.FederatedDataset:
        rng = np.random.default_rng(seed)
        centers = rng.normal(0.0, 1.0, (NUM_CLASSES, self.dim))

        def split(labels: np.ndarray) -> fleetfl.Split:
            x = centers[labels] + rng.normal(0.0, 0.8, (len(labels), self.dim))
            return fleetfl.Split(x=x.astype(np.float32), y=labels.astype(np.int64))

        clients = []
        for _ in range(num_clients):
            share = rng.dirichlet([self.skew] * NUM_CLASSES)
            clients.append((split(rng.choice(NUM_CLASSES, 80, p=share)),
                            split(rng.choice(NUM_CLASSES, 20, p=share))))
        return fleetfl.FederatedDataset(
            name="blobs", clients=tuple(clients), test=split(rng.integers(0, NUM_CLASSES, 1000)),
            input_shape=(self.dim,), num_classes=NUM_CLASSES)
