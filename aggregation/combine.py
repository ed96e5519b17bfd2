"""Combining the round's readable updates into one Δ, with the configured defences.

Two readable forms reach the coordinator (secure aggregation, which yields only a sum, is
:mod:`fleetfl.coordinator.secure_strategy`'s):

* float32 Δ_k, weighted by example counts n_k: Δ̄ = Σ n_k Δ_k / Σ n_k
  (:func:`fleetfl.aggregation.average.weighted_average`);
* int8 q_k ≈ ω_k Δ_k / s: Δ̄ = s Σ q_k / Σ ω_k, from the exact integer sum
  (:mod:`fleetfl.aggregation.int8_mean`).

:class:`RobustRule` adds, before the mean, per-client norm bounding (an int8 update is read as
s q_k / ω_k for its norm, and scaled as rint(f_k q_k), still integers) and can replace the mean
by the coordinate-wise trimmed mean or median (:mod:`fleetfl.aggregation.robust`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetfl.aggregation.average import weighted_average
from fleetfl.aggregation.int8_mean import int8_weighted_mean
from fleetfl.aggregation.robust import (
    bound_factors,
    coordinate_median,
    l2_norm,
    norm_bound,
    trimmed_mean,
)
from fleetfl.compression.quantize import int8_scale


@dataclass(frozen=True)
class RobustRule:
    """``[aggregation]``: norm bounds (0: off) and the combining rule."""

    clip_norm: float = 0.0
    norm_bound_ratio: float = 0.0
    rule: str = "mean"  # "mean" | "trimmed_mean" | "median"
    trim_fraction: float = 0.1


@dataclass(frozen=True)
class Combined:
    """The round's Δ (float64 tensors, in input order) and how many updates were scaled."""

    delta: list[np.ndarray]
    norm_bounded: int


def combine_float(updates: Sequence[Sequence[np.ndarray]], num_examples: Sequence[int],
                  rule: RobustRule) -> Combined:
    """Δ̄ of float updates (see the module docstring)."""
    factors = _factors([l2_norm(u) for u in updates], rule)
    scaled = [[t * f for t in u] if f < 1 else list(u) for u, f in zip(updates, factors,
                                                                         strict=True)]
    return Combined(_rule(scaled, num_examples, rule), int((factors < 1).sum()))


def combine_int8(updates: Sequence[Sequence[np.ndarray]], omega: Sequence[float], clip: float,
                 rule: RobustRule) -> Combined:
    """Δ̄ of int8 updates q_k sent with update weights ω_k at the shared ``clip``."""
    s = int8_scale(clip)
    factors = _factors([s * l2_norm(u) / w for u, w in zip(updates, omega, strict=True)], rule)
    ints = [[np.rint(t * f).astype(np.int64) if f < 1 else t.astype(np.int64) for t in u]
            for u, f in zip(updates, factors, strict=True)]
    bounded = int((factors < 1).sum())
    if rule.rule != "mean":  # per-client readings s q_k / ω_k, combined coordinate-wise
        readings = [[t * (s / w) for t in u] for u, w in zip(ints, omega, strict=True)]
        return Combined(_rule(readings, [1] * len(ints), rule), bounded)
    total = sum(omega)
    sums = [sum(parts) for parts in zip(*ints, strict=True)]
    return Combined([int8_weighted_mean(q, total, clip) for q in sums], bounded)


def _factors(norms: list[float], rule: RobustRule) -> np.ndarray:
    return bound_factors(norms, norm_bound(norms, rule.clip_norm, rule.norm_bound_ratio))


def _rule(updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float],
          rule: RobustRule) -> list[np.ndarray]:
    if rule.rule == "trimmed_mean":
        return trimmed_mean(updates, rule.trim_fraction)
    if rule.rule == "median":
        return coordinate_median(updates)
    return weighted_average([list(u) for u in updates], list(weights))
