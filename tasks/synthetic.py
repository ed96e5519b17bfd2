"""The FedProx paper's Synthetic(alpha, beta) federated dataset (Li et al., MLSys 2020).

Reproduces the reference generators ``data/synthetic_*/generate_synthetic.py`` and
``data/synthetic_iid/generate_iid.py`` of litian96/FedProx draw for draw, with the legacy
numpy RNG semantics of ``np.random.*`` but on a private ``np.random.RandomState(seed)`` so
global state is never touched. Per user ``k``:

    u_k ~ N(0, alpha), B_k ~ N(0, beta), v_k ~ N(B_k, 1)        (v_k in R^60)
    W_k ~ N(u_k, 1) (60 x 10), b_k ~ N(u_k, 1) (10,)
    x ~ N(v_k, Sigma), Sigma = diag(j^-1.2), j = 1..60
    y = argmax(softmax(x W_k + b_k))

alpha controls how much the local models differ, beta how much the local inputs differ.
The IID variant uses one W ~ N(0, 1), b ~ N(0, 1) and x ~ N(0, Sigma) for every user.
"""

from __future__ import annotations

import numpy as np

from fleetfl.tasks.data import FederatedDataset, Split, concat_splits


def _covariance_factor(dimension: int) -> np.ndarray:
    """Factor A with A.T @ A = Sigma = diag(j^-1.2), j = 1..dimension; float64 (d, d).

    Computed exactly as ``RandomState.multivariate_normal`` does (SVD: A = sqrt(s)[:, None]
    * v), so that ``_multivariate_normal`` reproduces its samples bit for bit while running
    the SVD once instead of once per user (it dominated the run time).
    """
    cov = np.diag(np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2))
    _, s, v = np.linalg.svd(cov)
    return np.sqrt(s)[:, None] * v


def _multivariate_normal(
    rng: np.random.RandomState, mean: np.ndarray, factor: np.ndarray, n: int
) -> np.ndarray:
    """``rng.multivariate_normal(mean, Sigma, n)`` given Sigma's factor; float64 (n, d)."""
    x = rng.standard_normal((n, len(mean)))
    x = np.dot(x, factor)
    x += mean
    return x


def _labels(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class labels argmax(x @ w + b) per row, int64, shape (n,).

    The reference takes argmax of softmax(logits); softmax is monotone so the argmax is the
    same, and skipping it avoids exp overflow for extreme alpha.
    """
    return np.argmax(x @ w + b, axis=1).astype(np.int64)


def _users_niid(
    rng: np.random.RandomState,
    counts: np.ndarray,
    alpha: float,
    beta: float,
    dimension: int,
    num_classes: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-user (x float64 (n_k, dimension), y int64 (n_k,)) in the reference's draw order."""
    num_users = len(counts)
    mean_w = rng.normal(0, alpha, num_users)
    mean_b = mean_w  # the reference shares the prior mean of W and b
    b_prior = rng.normal(0, beta, num_users)
    factor = _covariance_factor(dimension)
    # All input means are drawn before any user's model or data, as in the reference.
    mean_x = np.stack([rng.normal(b_prior[i], 1, dimension) for i in range(num_users)])
    users = []
    for i in range(num_users):
        w = rng.normal(mean_w[i], 1, (dimension, num_classes))
        b = rng.normal(mean_b[i], 1, num_classes)
        x = _multivariate_normal(rng, mean_x[i], factor, counts[i])
        users.append((x, _labels(x, w, b)))
    return users


def _users_iid(
    rng: np.random.RandomState, counts: np.ndarray, dimension: int, num_classes: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-user (x, y) sharing one model and input distribution, in generate_iid.py's order."""
    factor = _covariance_factor(dimension)
    mean_x = np.zeros(dimension)
    w = rng.normal(0, 1, (dimension, num_classes))
    b = rng.normal(0, 1, num_classes)
    users = []
    for n in counts:
        x = _multivariate_normal(rng, mean_x, factor, n)
        users.append((x, _labels(x, w, b)))
    return users


def _shuffle_split(
    rng: np.random.RandomState, x: np.ndarray, y: np.ndarray, train_fraction: float
) -> tuple[Split, Split]:
    """Shuffle one user's examples and cut the first int(train_fraction * n) off as train."""
    order = rng.permutation(len(y))
    x = x[order].astype(np.float32)
    y = y[order]
    n_train = int(train_fraction * len(y))
    return Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:])


def generate_synthetic(
    alpha: float,
    beta: float,
    *,
    iid: bool = False,
    num_users: int = 30,
    seed: int = 0,
    dimension: int = 60,
    num_classes: int = 10,
    train_fraction: float = 0.9,
) -> FederatedDataset:
    """Generate Synthetic(alpha, beta) (or Synthetic-IID) as the FedProx reference does.

    Args:
        alpha: std of the prior mean of each user's model (W, b); ignored when ``iid``.
        beta: std of the prior mean of each user's input mean; ignored when ``iid``.
        iid: all users share one model and input distribution (the paper's Synthetic-IID).
        num_users: number of users (clients); the reference uses 30.
        seed: seed of the private ``RandomState``; same seed gives identical arrays.
        dimension: number of features (60 in the paper).
        num_classes: number of classes (10 in the paper).
        train_fraction: per-user share of (shuffled) examples used for training.

    Returns:
        FederatedDataset with ``num_users`` clients; user ``k`` has
        ``int(lognormal(4, 2)) + 50`` examples (heavy-tailed sizes), x float32 of shape
        ``(n, dimension)``, y int64. ``test`` is the union of the users' test splits.

    The reference shuffles with Python's unseeded ``random``; here the shuffle uses the same
    ``RandomState``, after all generation draws, so the generated data match the reference.
    """
    if num_users < 1:
        raise ValueError(f"num_users must be >= 1, got {num_users}")
    if dimension < 1 or num_classes < 2:
        raise ValueError(
            f"need dimension >= 1 and num_classes >= 2, got {dimension}, {num_classes}"
        )
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if not iid and (alpha < 0 or beta < 0):
        raise ValueError(f"alpha and beta are standard deviations, must be >= 0: {alpha}, {beta}")
    rng = np.random.RandomState(seed)
    counts = rng.lognormal(4, 2, num_users).astype(int) + 50
    if iid:
        users = _users_iid(rng, counts, dimension, num_classes)
    else:
        users = _users_niid(rng, counts, alpha, beta, dimension, num_classes)
    clients = tuple(_shuffle_split(rng, x, y, train_fraction) for x, y in users)
    return FederatedDataset(
        name="synthetic",
        clients=clients,
        test=concat_splits([test for _, test in clients]),
        input_shape=(dimension,),
        num_classes=num_classes,
    )
