"""Weighted averaging of client models, and the checks an update must pass first.

FedAvg and FedProx aggregate the same way on the server (Li et al. 2020, Alg. 2; McMahan et al.
2017): with client k returning weights w_k trained on n_k examples,

    w^{t+1} = sum_k n_k * w_k / sum_k n_k

FedProx differs only in the clients' local objective and in *keeping* partial work from
stragglers; which replies are kept is decided by the caller (see ``coordinator/strategy.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_update(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> str | None:
    """Return why ``arrays`` cannot be aggregated against ``reference``, or ``None`` if it can.

    Checks the tensor count, each tensor's shape and dtype kind (float), and that every value is
    finite. The message names the first offending tensor by index.
    """
    if len(arrays) != len(reference):
        return f"expected {len(reference)} tensors, got {len(arrays)}"
    for i, (arr, ref) in enumerate(zip(arrays, reference, strict=True)):
        if arr.shape != ref.shape:
            return f"tensor {i}: shape {arr.shape} != expected {ref.shape}"
        if arr.dtype.kind != "f":
            return f"tensor {i}: dtype {arr.dtype} is not floating point"
        if not np.isfinite(arr).all():
            return f"tensor {i}: contains NaN or Inf"
    return None


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
