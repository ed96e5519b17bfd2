"""scikit-learn's bundled 8x8 handwritten digits, partitioned over clients."""

from __future__ import annotations

import numpy as np

from fleetfl.tasks.data import FederatedDataset, Split
from fleetfl.tasks.partition import dirichlet_label_partition, iid_partition

INPUT_SHAPE: tuple[int, ...] = (1, 8, 8)
NUM_CLASSES = 10
# Pixel intensities in load_digits are integers 0..16.
_MAX_PIXEL = 16.0
# Smallest shard a client may get: 4 train + 1 local test examples after the 80/20 split.
# Larger values make Dirichlet(0.5) over 100 clients (about 14 examples each) infeasible.
DEFAULT_MIN_CLIENT_SIZE = 5
LOCAL_TEST_FRACTION = 0.2


def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: x float32 in [0, 1] of shape (n, 1, 8, 8), y int64 of shape (n,)."""
    # Imported here: a device with only fleetfl[device] (no scikit-learn) imports this package.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / _MAX_PIXEL).reshape(-1, *INPUT_SHAPE)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


def _local_split(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, test_fraction: float
) -> tuple[Split, Split]:
    """Shuffle one client's shard and split it; both parts non-empty when len >= 2."""
    n = len(y)
    n_test = round(test_fraction * n)
    if n >= 2:  # a client with data should be able to both train and evaluate
        n_test = min(max(n_test, 1), n - 1)
    order = rng.permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])


def load_digits_federated(
    num_clients: int,
    *,
    partition_alpha: float,
    seed: int,
    test_fraction: float = 0.2,
    iid: bool = False,
    min_client_size: int = DEFAULT_MIN_CLIENT_SIZE,
) -> FederatedDataset:
    """Federated 8x8 digits: global stratified test set plus label-skewed client shards.

    Args:
        num_clients: number of clients.
        partition_alpha: Dirichlet concentration of the label skew (ignored when ``iid``).
        seed: controls the global split, the partition and the clients' local splits.
        test_fraction: share of all 1797 examples held out as the global ``test`` set
            (stratified by label, ``random_state=seed``); no client ever sees them.
        iid: partition uniformly at random instead of by Dirichlet label skew.
        min_client_size: minimum shard size per client for the Dirichlet partition.

    Returns:
        FederatedDataset named ``"digits"``, ``input_shape == (1, 8, 8)``, 10 classes,
        x float32 in [0, 1]. Each client's shard is split 80/20 into its (train, test).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split

    x, y = _load_arrays()
    pool_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    pool_y = y[pool_idx]
    if iid:
        shards = iid_partition(len(pool_idx), num_clients, seed)
    else:
        shards = dirichlet_label_partition(
            pool_y, num_clients, partition_alpha, seed, min_size=min_client_size
        )
    # Independent stream for the local splits so they do not correlate with the partition.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_clients)]
    clients = tuple(
        _local_split(x[pool_idx[shard]], y[pool_idx[shard]], rng, LOCAL_TEST_FRACTION)
        for shard, rng in zip(shards, rngs, strict=True)
    )
    return FederatedDataset(
        name="digits",
        clients=clients,
        test=Split(x[test_idx], y[test_idx]),
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
    )
