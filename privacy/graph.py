"""The SecAgg+ neighbour graph and the choice of its degree ``k`` and Shamir threshold ``t``.

**Graph** (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020, §4: the random Harary graph ``H(n, k)``). The cohort is put in a random cyclic order
and every client is joined to the ``k / 2`` clients before and after it. The order is public and
reproducible by every client from the coordinator's 32-byte seed: clients sorted by
``SHA-256(seed, node id)`` (:func:`ring_order`). ``k`` is even; an odd ``k`` is rounded up, and
``k >= n - 1`` is the complete graph (the original SecAgg of Bonawitz et al., CCS 2017).
Each client's secrets are shared with its ``k`` neighbours plus itself (``k + 1`` holders, the
client keeps one share), so in the complete graph a round survives up to ``n - t`` dropouts.

**Parameters** (:func:`choose_parameters`). Following Bell et al.'s analysis, the coordinator
plus up to a fraction ``γ`` of clients collude (``corrupt_fraction``), up to a fraction ``δ``
drop out (``dropout_fraction``), both chosen without knowledge of the graph's random order. With
``B_c = floor(γ n)`` corrupt and ``B_d = floor(δ n)`` dropped clients, ``N = n - 1``, and
``HG(N, K, k)`` the hypergeometric count of marked clients among ``k`` neighbours drawn from the
``N`` others of which ``K`` are marked (a node's neighbourhood in ``H(n, k)`` under a random
order is a uniform ``k``-subset):

1. *shares stay secret*: ``n · P[HG(N, B_c, k) >= t] <= 2^-σ`` -- no client has ``t`` corrupt
   neighbours, who could rebuild the secret that the coordinator does not learn;
2. *the round completes*: every secret keeps ``t`` live holders, ``n · P[HG(N, N - B_d, k) <=
   t - 2] <= 2^-η`` for a survivor (its own share counts) and ``n · P[HG(N, N - B_d + 1, k) <=
   t - 1] <= 2^-η`` for a dropped client;
3. *only the whole sum leaks*: the honest surviving clients stay connected. In ``H(n, k)``
   that fails only if two runs of ``k / 2`` consecutive positions are all corrupt or dropped, so
   ``C(n, 2) · C(B, k) / C(n, k) <= 2^-σ`` with ``B = B_c + B_d`` (union bound over pairs);
4. *majority*: ``t >= floor((k + 1) / 2) + 1``, so a coordinator that tells some holders a
   client dropped and others that it survived cannot collect ``t`` shares of both of its secrets
   (two disjoint sets of ``t`` holders do not fit in ``k + 1``).

``t`` is the smallest value meeting 1 and 4; ``k`` is the smallest even degree for which 2 and
3 hold too, else the complete graph (where 1-3 are exact counts: ``t > B_c`` and
``n - B_d >= t``). This gives Bell et al.'s ``k = O(log n + σ)``: condition 3 alone needs
``k ≈ (σ + 2 log2 n) / log2(1 / (γ + δ))``. Defaults σ = 40, η = 30 are the paper's. For the
cohorts of a few dozen to a few hundred clients of an edge fleet, with ``δ`` = 0.3, the answer
is usually the complete graph: the logarithmic degree pays off from thousands of clients on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleetfl.privacy.crypto import digest

SECURITY_BITS = 40  # σ: the paper's statistical security parameter
CORRECTNESS_BITS = 30  # η: the paper's failure probability of a round, 2^-η


def ring_order(cohort: Sequence[int], seed: bytes) -> list[int]:
    """The cohort's public random cyclic order: node ids sorted by ``SHA-256(seed, id)``."""
    return sorted(cohort, key=lambda node: digest(seed, node.to_bytes(8, "little")))


def neighbours(cohort: Sequence[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours in the random Harary graph ``H(n, k)`` (never itself).

    ``k`` is rounded up to even; ``k >= n - 1`` gives the complete graph.
    """
    nodes = list(cohort)
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("cohort node ids must be distinct")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = effective_degree(n, k)
    if k == n - 1:
        everyone = frozenset(nodes)
        return {u: everyone - {u} for u in nodes}
    order = ring_order(nodes, seed)
    half = k // 2
    return {u: frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j)
            for i, u in enumerate(order)}


def neighbours_of(cohort: Sequence[int], k: int, seed: bytes, node: int) -> frozenset[int]:
    """``neighbours(cohort, k, seed)[node]`` without building the whole graph (O(n log n))."""
    nodes = list(cohort)
    n = len(nodes)
    if node not in nodes:
        raise ValueError(f"node {node} is not in the cohort")
    k = effective_degree(n, k)
    if k == n - 1:
        return frozenset(nodes) - {node}
    order = ring_order(nodes, seed)
    i, half = order.index(node), k // 2
    return frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j)


def effective_degree(n: int, k: int) -> int:
    """The degree :func:`neighbours` builds for ``k``: even, or ``n - 1`` (complete)."""
    k = k + (k % 2)
    return min(k, n - 1)


@dataclass(frozen=True)
class GraphBounds:
    """log2 of the failure probabilities of :func:`choose_parameters`' conditions 1-3."""

    log2_share_leak: float  # condition 1
    log2_round_fails: float  # condition 2
    log2_disconnected: float  # condition 3


def bounds(n: int, k: int, t: int, corrupt_fraction: float,
           dropout_fraction: float) -> GraphBounds:
    """The three failure bounds for cohort ``n``, degree ``k``, threshold ``t`` (log2)."""
    k = effective_degree(n, k)
    corrupt, dropped = math.floor(corrupt_fraction * n), math.floor(dropout_fraction * n)
    others = n - 1
    if k == others:  # complete graph: exact counts, no randomness
        return GraphBounds(0.0 if corrupt >= t else -math.inf,
                           0.0 if n - dropped < t else -math.inf, -math.inf)
    log2n = math.log2(n)
    leak = log2n + _log2_tail_at_least(others, corrupt, k, t)
    # a survivor holds its own share (t - 1 live neighbours do); a dropped client needs t
    fails = log2n + _log2_tail_at_most(others, others - dropped, k, t - 2)
    if dropped:
        fails = max(fails, log2n + _log2_tail_at_most(others, n - dropped, k, t - 1))
    bad = corrupt + dropped
    if bad < k:
        disconnected = -math.inf
    else:
        disconnected = (math.log2(math.comb(n, 2))
                        + (_log_comb(bad, k) - _log_comb(n, k)) / math.log(2))
    return GraphBounds(min(leak, 0.0), min(fails, 0.0), min(disconnected, 0.0))


def choose_parameters(
    n: int,
    *,
    corrupt_fraction: float = 0.1,
    dropout_fraction: float = 0.3,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
    num_neighbours: int | None = None,
    threshold: int | None = None,
) -> tuple[int, int]:
    """``(k, t)`` for a cohort of ``n`` (see the module docstring for the conditions).

    A given ``num_neighbours`` or ``threshold`` is kept (``k`` made even or ``n - 1``; ``t``
    checked to be in ``[2, k + 1]``) and the other is derived. Raises ``ValueError`` when no
    ``k`` satisfies the conditions, naming what to relax.
    """
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    if not (0.0 <= corrupt_fraction < 1.0 and 0.0 <= dropout_fraction < 1.0):
        raise ValueError("corrupt_fraction and dropout_fraction must be in [0, 1)")
    if num_neighbours is not None:
        degrees = [effective_degree(n, num_neighbours)]
    else:
        degrees = [*range(2, n - 1, 2), n - 1]
    for k in degrees:
        t = threshold if threshold is not None else _threshold(n, k, corrupt_fraction,
                                                               security_bits)
        if not 2 <= t <= k + 1:
            continue
        b = bounds(n, k, t, corrupt_fraction, dropout_fraction)
        if (b.log2_share_leak <= -security_bits and b.log2_round_fails <= -correctness_bits
                and b.log2_disconnected <= -security_bits):
            return k, t
    if num_neighbours is not None and threshold is not None:
        k = degrees[0]
        if not 2 <= threshold <= k + 1:
            raise ValueError(f"threshold must be in [2, k + 1 = {k + 1}], got {threshold}")
        return k, threshold  # both given: the caller's choice, even if the bounds fail
    raise ValueError(
        f"no (k, t) for n={n} keeps shares secret against {corrupt_fraction:.0%} corrupt "
        f"clients and completes with {dropout_fraction:.0%} dropouts at 2^-{security_bits} / "
        f"2^-{correctness_bits}: lower secagg.dropout_fraction or secagg.corrupt_fraction, or "
        "give secagg.num_neighbours and secagg.threshold explicitly")


def _threshold(n: int, k: int, corrupt_fraction: float, security_bits: int) -> int:
    """Smallest ``t`` meeting conditions 1 (shares secret) and 4 (majority) for degree ``k``."""
    t = max(2, (k + 1) // 2 + 1)
    while t <= k + 1:
        leak = bounds(n, k, t, corrupt_fraction, 0.0).log2_share_leak
        if leak <= -security_bits:
            return t
        t += 1
    return k + 2  # none: the caller rejects it


def _log_comb(a: int, b: int) -> float:
    """Natural log of C(a, b) (``-inf`` outside ``0 <= b <= a``)."""
    if not 0 <= b <= a:
        return -math.inf
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _log_hypergeom(total: int, marked: int, draws: int, x: int) -> float:
    return (_log_comb(marked, x) + _log_comb(total - marked, draws - x)
            - _log_comb(total, draws))


def _log2_tail_at_least(total: int, marked: int, draws: int, t: int) -> float:
    """log2 P[HG(total, marked, draws) >= t]."""
    return _log2_sum(_log_hypergeom(total, marked, draws, x)
                     for x in range(max(t, 0), min(draws, marked) + 1))


def _log2_tail_at_most(total: int, marked: int, draws: int, t: int) -> float:
    """log2 P[HG(total, marked, draws) <= t]."""
    return _log2_sum(_log_hypergeom(total, marked, draws, x)
                     for x in range(max(0, draws - (total - marked)), min(t, draws) + 1))


def _log2_sum(logs: Iterable[float]) -> float:
    values = [v for v in logs if v != -math.inf]
    if not values:
        return -math.inf
    top = max(values)
    return (top + math.log(sum(math.exp(v - top) for v in values))) / math.log(2)
