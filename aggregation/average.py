"""Weighted averaging of client updates.

FedAvg and FedProx aggregate the same way on the server (Li et al. 2020, Alg. 2; McMahan et al.
2017): with client k returning weights w_k trained on n_k examples,

    w^{t+1} = sum_k n_k * w_k / sum_k n_k

FedProx differs only in the clients' local objective and in *keeping* partial work from
stragglers; which replies are kept is decided by the caller (see ``coordinator/strategy.py``),
after the codec has validated them. Averaging updates Δ_k = w_k − w^t with the same weights
gives the same model: w^{t+1} = w^t + sum_k n_k Δ_k / sum_k n_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_average(
    updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """Average tensor lists with non-negative ``weights`` (e.g. example counts).

    Accumulates in float64 and returns each tensor in the dtype of the first update.
    Raises ``ValueError`` for an empty cohort or a non-positive total weight.
    """
    if not updates:
        raise ValueError("cannot average an empty set of updates")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(updates)} non-negative numbers with positive sum")
    w = w / w.sum()
    out = []
    for i, first in enumerate(updates[0]):
        acc = np.zeros(first.shape, dtype=np.float64)
        for wk, upd in zip(w, updates, strict=True):
            acc += wk * upd[i]
        out.append(acc.astype(first.dtype))
    return out
