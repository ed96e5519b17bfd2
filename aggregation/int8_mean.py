"""The example-weighted mean of int8 updates, computed from their integer sum.

Client k of the round's cohort C trained on n_k examples and has the update Δ_k; the
coordinator wants FedProx's weighted mean over the replies it keeps, S ⊆ C:

    Δ̄_S = Σ_{k∈S} n_k Δ_k / Σ_{k∈S} n_k.

To make that a plain sum of integers (what secure aggregation can compute), the coordinator
sends each client its *update weight* (:func:`update_weights`)

    ω_k = n_k |C| / Σ_{j∈C} n_j        (the cohort's mean weight is 1, so Σ_{k∈C} ω_k = |C|),

and client k sends q_k = Q(ω_k Δ_k), int8 with the cohort's shared clip range c and step
s = c / 127 (``fleetfl.compression.quantize.quantize_int8``; stochastic rounding makes
E[s q_k] = ω_k Δ_k and |s q_k − ω_k Δ_k| < s wherever |ω_k Δ_k| <= c). The coordinator adds
the integers and dequantizes only the sum (:func:`int8_weighted_mean`):

    Δ̂_S = s Σ_{k∈S} q_k / Σ_{k∈S} ω_k.

Since ω_k ∝ n_k, the common factor |C| / Σ_C n_j cancels: Σ_S ω_k Δ_k / Σ_S ω_k = Δ̄_S for
any S, survivors of dropouts included. Per coordinate, unbiased, with error

    |Δ̂_S − Δ̄_S| < |S| s / Σ_{k∈S} ω_k        (= s when S = C, as Σ_C ω_k = |C|).

Values clipped at ±c are outside this bound (client-side error feedback re-sends them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fleetfl.compression.quantize import dequantize_sum


def update_weights(num_examples: Mapping[int, int]) -> dict[int, float]:
    """ω_k = n_k |C| / Σ_j n_j for each node k of the cohort C (node id -> example count).

    The weights keep the mapping's order and average 1 over the cohort. Raises ``ValueError``
    for an empty cohort, a negative count or a non-positive total.
    """
    if not num_examples:
        raise ValueError("cannot weight an empty cohort")
    if any(n < 0 for n in num_examples.values()):
        raise ValueError(f"example counts must be non-negative, got {dict(num_examples)}")
    total = sum(num_examples.values())
    if total <= 0:
        raise ValueError(f"the cohort's example counts must have a positive sum, got {total}")
    size = len(num_examples)
    return {node: n * size / total for node, n in num_examples.items()}


def int8_weighted_mean(q_sum: np.ndarray, omega_total: float, clip: float) -> np.ndarray:
    """s · Σ_k q_k / Σ_k ω_k as float64, from the integer sum ``q_sum`` of the int8 updates.

    ``omega_total`` is Σ ω_k over the same clients as ``q_sum``; ``clip`` is the round's shared
    int8 clip range (s = ``int8_scale(clip)``). Raises ``ValueError`` for a non-integer
    ``q_sum`` or an ``omega_total`` that is not a finite positive number.
    """
    if not (math.isfinite(omega_total) and omega_total > 0):
        raise ValueError(f"the total update weight must be finite and positive, got {omega_total}")
    return dequantize_sum(q_sum, clip) / omega_total
