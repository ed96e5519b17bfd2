"""Containers for federated datasets: one client's split and the whole federation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """A set of labelled examples.

    Attributes:
        x: features, shape ``(n, *input_shape)``, any real numeric dtype: float32 features, or
            integer ids (a text task's token ids; the model converts them, e.g. for
            ``nn.Embedding``).
        y: class labels, int64, shape ``(n,)``, values in ``[0, num_classes)``.

    The arrays may be shared with a cache (see ``fleetfl.tasks.registry``): treat them as
    read-only and copy before modifying in place.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside a training loop.
        if not (np.issubdtype(self.x.dtype, np.floating)
                or np.issubdtype(self.x.dtype, np.integer)):
            raise ValueError(f"Split.x must hold real numbers, got {self.x.dtype}")
        if self.y.dtype != np.int64:
            raise ValueError(f"Split.y must be int64, got {self.y.dtype}")
        if self.y.ndim != 1 or self.x.ndim < 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"Split needs x of shape (n, ...) and y of shape (n,), "
                f"got x{self.x.shape} and y{self.y.shape}"
            )

    def __len__(self) -> int:
        """Number of examples ``n``."""
        return len(self.y)


def concat_splits(splits: list[Split] | tuple[Split, ...]) -> Split:
    """Concatenate splits along the example axis, in the given order."""
    if not splits:
        raise ValueError("concat_splits needs at least one split")
    x = np.concatenate([s.x for s in splits], axis=0)
    y = np.concatenate([s.y for s in splits], axis=0)
    return Split(x=x, y=y)


@dataclass(frozen=True)
class FederatedDataset:
    """A dataset partitioned over clients, plus a global held-out test set.

    Attributes:
        name: dataset identifier, e.g. ``"synthetic"`` or ``"digits"``.
        clients: per client ``(train, test)``; client ``i`` is ``clients[i]``.
        test: global held-out test set used for central (server-side) evaluation.
        input_shape: shape of one example, e.g. ``(60,)`` or ``(1, 8, 8)``.
        num_classes: number of label classes.
    """

    name: str
    clients: tuple[tuple[Split, Split], ...]
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if not self.clients:
            raise ValueError("FederatedDataset needs at least one client")

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def train_union(self) -> Split:
        """All clients' train splits concatenated in client order (for the global train loss)."""
        return concat_splits([train for train, _ in self.clients])
