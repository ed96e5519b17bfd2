"""Combining the clients' evaluation metrics: example-weighted means, bounded trust.

Client k reports n_k test examples and metrics m_k (loss, accuracy, ...); the federation's
value of each metric is

    m = Σ_k w_k m_k / Σ_k w_k,   w_k = min(n_k, max_examples).

A reply with a non-positive count, a non-finite value or a metric the others do not report is
left out (and named), so one lying client can move the mean by at most
``max_examples / Σ_k w_k`` of the metric's range, and never to NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

DEFAULT_MAX_EXAMPLES = 1 << 20  # per client: the weight of a claim is capped here


def weighted_metrics(
    replies: Sequence[tuple[int, Mapping[str, float]]],
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> tuple[dict[str, float], int, list[str]]:
    """Example-weighted means of the metrics in ``replies`` ``(num_examples, metrics)``.

    Returns ``(means, examples, problems)``: the mean of every metric all kept replies report,
    the total (capped) example count, and a reason for every reply left out.
    """
    kept: list[tuple[int, Mapping[str, float]]] = []
    problems: list[str] = []
    for i, (n, values) in enumerate(replies):
        if not isinstance(n, int) or n <= 0:
            problems.append(f"reply {i}: example count {n!r} is not a positive integer")
        elif not all(isinstance(v, int | float) and math.isfinite(v) for v in values.values()):
            problems.append(f"reply {i}: a metric is not a finite number")
        else:
            kept.append((min(n, max_examples), values))
    if not kept:
        return {}, 0, problems
    keys = set.intersection(*(set(v) for _, v in kept))
    total = sum(n for n, _ in kept)
    means = {k: sum(n * float(v[k]) for n, v in kept) / total for k in sorted(keys)}
    return means, total, problems
