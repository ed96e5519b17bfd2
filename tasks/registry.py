"""Dataset lookup by name, memoized per process."""

from __future__ import annotations

from functools import lru_cache

from fleetfl.tasks.data import FederatedDataset
from fleetfl.tasks.digits import load_digits_federated
from fleetfl.tasks.synthetic import generate_synthetic

DATASET_NAMES: tuple[str, ...] = ("synthetic", "digits")


# Flower's simulation instantiates the ClientApp many times per process; caching means the
# data are generated/partitioned once. The returned arrays are shared: do not mutate them.
@lru_cache(maxsize=8)
def load_federated(
    dataset: str,
    *,
    num_clients: int,
    seed: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    partition_alpha: float = 0.5,
) -> FederatedDataset:
    """Load federated dataset ``dataset`` in {"synthetic", "digits"} split over clients.

    Args:
        dataset: dataset name, one of ``DATASET_NAMES``.
        num_clients: number of clients (the synthetic ``num_users``).
        seed: seed of all randomness; equal arguments give identical data.
        alpha, beta: Synthetic(alpha, beta) heterogeneity; used by "synthetic" only.
        iid: the IID variant (Synthetic-IID, or a uniform random partition of digits).
        partition_alpha: Dirichlet label-skew concentration; used by "digits" only.

    Raises:
        ValueError: unknown ``dataset`` or invalid arguments for it.
    """
    if dataset == "synthetic":
        return generate_synthetic(alpha, beta, iid=iid, num_users=num_clients, seed=seed)
    if dataset == "digits":
        return load_digits_federated(
            num_clients, partition_alpha=partition_alpha, seed=seed, iid=iid
        )
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_NAMES)}")
