"""Partitioning example indices over clients: IID and Dirichlet label skew."""

from __future__ import annotations

import math

import numpy as np

DEFAULT_MAX_TRIES = 1000


def _check_common(n: int, num_clients: int, min_size: int) -> None:
    """Raise ValueError unless ``n`` examples can give every client ``min_size`` of them."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n < num_clients * max(min_size, 1):
        raise ValueError(
            f"not enough samples: {n} examples cannot give {num_clients} clients "
            f"at least {max(min_size, 1)} each"
        )


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` uniformly at random into ``num_clients`` near-equal shards.

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint, covering ``range(n)``; sizes
        differ by at most one.
    """
    _check_common(n, num_clients, 1)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(shard) for shard in np.array_split(order, num_clients)]


def _dirichlet_attempt(
    rng: np.random.Generator,
    class_indices: list[np.ndarray],
    num_clients: int,
    alpha: float,
    n: int,
) -> list[np.ndarray]:
    """One draw of the per-class Dirichlet split; returns unsorted index arrays per client."""
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for idx in class_indices:
        idx = rng.permutation(idx)
        if math.isinf(alpha):
            proportions = np.full(num_clients, 1.0 / num_clients)
        else:
            proportions = rng.dirichlet(np.full(num_clients, alpha))
        # Clients already holding their fair share get nothing more from this class (the
        # balancing of Wang et al. 2020, FedMA, and Li et al. 2022, NIID-Bench). It keeps the
        # label skew but makes the min_size condition far likelier with many small clients.
        proportions = proportions * (sizes < n / num_clients)
        total = proportions.sum()
        # total is 0 only through float underflow of tiny Dirichlet draws.
        uniform = np.full(num_clients, 1.0 / num_clients)
        proportions = proportions / total if total > 0 else uniform
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            shards[client].append(part)
            sizes[client] += len(part)
    return [np.concatenate(parts) for parts in shards]


def dirichlet_label_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    *,
    max_tries: int = DEFAULT_MAX_TRIES,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split over clients by Dirichlet(alpha) shares.

    For every class, its indices are shuffled and cut into ``num_clients`` pieces with
    proportions ~ Dirichlet(alpha * 1) (Hsu et al. 2019; Yurochkin et al. 2019). Smaller
    ``alpha`` means more skew (each client sees few classes); ``alpha = inf`` gives equal
    shares of every class (near-IID). The whole draw is repeated until every client has at
    least ``min_size`` examples.

    Args:
        labels: class label per example, integer array of shape ``(n,)``.
        num_clients: number of shards, >= 1.
        alpha: Dirichlet concentration, > 0 (``math.inf`` allowed).
        seed: seed of ``np.random.default_rng``; the result is a function of the arguments.
        min_size: minimum number of examples per client.
        max_tries: number of draws before giving up.

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint, covering ``range(n)``.

    Raises:
        ValueError: on invalid arguments, or if no draw within ``max_tries`` satisfies
            ``min_size`` (use a larger alpha, fewer clients or a smaller min_size).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype}{labels.shape}")
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    n = len(labels)
    _check_common(n, num_clients, min_size)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_tries):
        shards = _dirichlet_attempt(rng, class_indices, num_clients, alpha, n)
        smallest = min(len(s) for s in shards)
        if smallest >= min_size:
            return [np.sort(s).astype(np.int64) for s in shards]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) partition of {n} examples over {num_clients} clients left "
        f"some client with fewer than min_size={min_size} examples in all {max_tries} tries "
        f"(smallest in the last try: {smallest}); use a larger alpha, fewer clients or a "
        f"smaller min_size"
    )
