"""Defences for the updates the coordinator can read (float32, and int8 without secure
aggregation): per-client L2 norm bounding, coordinate-wise trimmed mean and median.

Each client's update is a list of tensors Δ_k (float64 here; for int8, the coordinator's
reading of it, ``s q_k / ω_k``). Norm bounding scales it by

    f_k = min(1, B / ‖Δ_k‖₂),   B = min(clip_norm, ratio · median_j ‖Δ_j‖₂)

(either bound off when 0), so a client that sends 1e30 moves the model no further than
``B`` (Sun et al. 2019, "Can You Really Backdoor Federated Learning?", bound by a fixed norm;
the median-relative bound needs no tuning while most of a round's clients are honest). The
trimmed mean drops, per coordinate, the ``⌊β n⌋`` largest and smallest values and averages the
rest unweighted; the median takes the coordinate-wise median (Yin et al. 2018). Both ignore
the example weights, as in those papers: a liar cannot buy influence with a large count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fleetfl.compression.quantize import TailCounts, empty_tail

Update = Sequence[np.ndarray]


def l2_norm(update: Update) -> float:
    """‖Δ‖₂ over all tensors of one update (float64 accumulation)."""
    return math.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in
                         (np.asarray(x, np.float64) for x in update)))


def norm_bound(norms: Sequence[float], clip_norm: float = 0.0, ratio: float = 0.0) -> float:
    """B = min(``clip_norm``, ``ratio`` · median norm); ``inf`` when both are 0 (off)."""
    bound = math.inf
    if clip_norm > 0:
        bound = clip_norm
    if ratio > 0 and len(norms):
        bound = min(bound, ratio * float(np.median(norms)))
    return bound


def bound_factors(norms: Sequence[float], bound: float) -> np.ndarray:
    """f_k = min(1, B / ‖Δ_k‖) per client (1 for a zero update or ``bound = inf``)."""
    n = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(n > bound, bound / np.maximum(n, np.finfo(np.float64).tiny), 1.0)


def clip_weights(weights: dict[str, np.ndarray], base: dict[str, np.ndarray],
                 clip_norm: float) -> dict[str, np.ndarray]:
    """A client's side of ``aggregation.clip_norm``: its new weights moved back towards
    ``base`` so that ‖weights − base‖₂ <= ``clip_norm`` (float tensors only; unchanged if
    already inside or ``clip_norm`` is 0)."""
    if clip_norm <= 0:
        return weights
    keys = [k for k in weights if np.issubdtype(weights[k].dtype, np.floating)]
    norm = l2_norm([weights[k] - base[k] for k in keys])
    if norm <= clip_norm:
        return weights
    f = clip_norm / norm
    return {**weights, **{k: (base[k] + f * (weights[k] - base[k])).astype(weights[k].dtype)
                          for k in keys}}


def trimmed_mean(updates: Sequence[Update], beta: float) -> list[np.ndarray]:
    """Coordinate-wise mean after dropping the ``⌊β n⌋`` largest and smallest values
    (``0 <= β < 0.5``; β = 0 is the plain unweighted mean)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    n, cut = len(updates), int(beta * len(updates))
    out = []
    for tensors in zip(*updates, strict=True):
        stacked = np.sort(np.stack([np.asarray(t, np.float64) for t in tensors]), axis=0)
        out.append(stacked[cut : n - cut].mean(axis=0))
    return out


def trimmed_tail_sum(tails: Sequence[TailCounts], beta: float) -> TailCounts:
    """The cohort's int8 clip-tail counts, robustly: per level, n × the mean of the clients'
    counts without the ``⌈β n⌉`` largest and smallest (none trimmed below 3 clients).

    A client's counts are already clamped to ``TAIL_COUNT_MAX``; on a small model even that
    much alone reads as "too much clipping" (127 of 650 values), so one client could widen the
    shared range every round. Trimmed, up to ``⌈β n⌉`` liars are dropped.
    """
    if not tails:
        return empty_tail()
    n = len(tails)
    cut = math.ceil(beta * n) if n >= 3 and beta > 0 else 0
    counts = np.sort(np.array([t.above for t in tails], dtype=np.float64), axis=0)
    kept = counts[cut : n - cut]
    total = sum(t.total for t in tails)
    return TailCounts(total, tuple(min(int(round(n * v)), total) for v in kept.mean(axis=0)))


def coordinate_median(updates: Sequence[Update]) -> list[np.ndarray]:
    """Coordinate-wise median of the updates."""
    return [np.median(np.stack([np.asarray(t, np.float64) for t in tensors]), axis=0)
            for tensors in zip(*updates, strict=True)]
