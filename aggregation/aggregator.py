"""One round's combining behind one small interface: ``add`` each update with its weight, then
``result``.

=================  ===============================  ===========  ===============================
aggregator         an update is                     its weight   the result Δ̄
=================  ===============================  ===========  ===============================
:class:`FloatMean` float32 Δ_k (tensors in order)   n_k          Σ n_k Δ_k / Σ n_k
:class:`Int8Sum`   int8 q_k ≈ ω_k Δ_k / s           ω_k          s Σ q_k / Σ ω_k (integer sum)
:class:`SecureSum` SecAgg+ masked input of q_k      ω_k          s Σ_S q_k / Σ_S ω_k, S survivors
=================  ===============================  ===========  ===============================

The first two apply the configured :class:`~fleetfl.aggregation.combine.RobustRule` (norm bounds,
trimmed mean or median) because the coordinator can read each update; the secure sum can only
be checked as a whole (:mod:`fleetfl.aggregation.sum_bounds`) and is refused when no honest
cohort could have produced it. A server optimizer then steps on Δ̄
(:mod:`fleetfl.aggregation.server_opt`). The strategy adds and reads; it holds no combining math.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetfl.aggregation.combine import Combined, RobustRule, combine_float, combine_int8
from fleetfl.aggregation.int8_mean import int8_weighted_mean
from fleetfl.aggregation.sum_bounds import secure_sum_problem
from fleetfl.privacy import SecAggAbort, SecAggServer

# Stage 4 of SecAgg+ on the caller's transport: unmask requests by node -> the replies that came.
Exchange = Callable[[Mapping[int, Any]], Mapping[int, Any]]


class Aggregator(ABC):
    """Combines one round's updates: :meth:`add` each, then :meth:`result` once."""

    @abstractmethod
    def add(self, node: int, update: Any, weight: float) -> None:
        """Take ``node``'s update with its weight (see the module table for what each is)."""

    @abstractmethod
    def result(self) -> Combined | None:
        """The round's Δ̄ (float64 tensors in input order), or None: no model update."""


class FloatMean(Aggregator):
    """Σ n_k Δ_k / Σ n_k of float32 updates, after the rule's norm bounds (or its robust rule)."""

    def __init__(self, rule: RobustRule) -> None:
        self.rule = rule
        self._updates: list[Sequence[np.ndarray]] = []
        self._weights: list[float] = []

    def add(self, node: int, update: Sequence[np.ndarray], weight: float) -> None:
        self._updates.append(update)
        self._weights.append(weight)

    def result(self) -> Combined | None:
        if not self._updates:
            return None
        return combine_float(self._updates, self._weights, self.rule)


class Int8Sum(FloatMean):
    """s Σ q_k / Σ ω_k from the exact integer sum of int8 updates at the shared ``clip``."""

    def __init__(self, rule: RobustRule, clip: float) -> None:
        super().__init__(rule)
        self.clip = clip

    def result(self) -> Combined | None:
        if not self._updates:
            return None
        return combine_int8(self._updates, self._weights, self.clip, self.rule)


@dataclass
class SecureOutcome:
    """What the coordinator learns of a secure round besides Δ̄ (for its records)."""

    survivors: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()  # the survivors' summed tail counts (next clip range)
    aborted: str | None = None  # too few clients left to unmask
    refused: str | None = None  # the sum is outside what honest clients can produce
    rejections: list[str] = field(default_factory=list)  # per-client protocol rejections
    server_s: float = 0.0  # coordinator compute seconds in the protocol


class SecureSum(Aggregator):
    """The survivors' mean from SecAgg+'s unmasked sum: the coordinator never sees a q_k.

    ``server`` has run stages 1-3; an update is a client's masked input record. :meth:`result`
    runs stage 4 through ``exchange``, checks the sum against what ``len(survivors)`` honest
    clients can give, and splits it into the values (``scatter``: kept coordinates -> tensors)
    and the last ``tail_levels`` tail counts. :attr:`outcome` says what happened.
    """

    def __init__(self, server: SecAggServer, exchange: Exchange, clip: float,
                 scatter: Callable[[np.ndarray], Sequence[np.ndarray]], tail_levels: int) -> None:
        self.server, self.exchange, self.clip = server, exchange, clip
        self.scatter, self.tail_levels = scatter, tail_levels
        self.outcome = SecureOutcome()
        self._inputs: dict[int, Any] = {}
        self._weights: dict[int, float] = {}

    def add(self, node: int, update: Any, weight: float) -> None:
        self._inputs[node] = update
        self._weights[node] = weight

    def result(self) -> Combined | None:
        try:
            unmask = self.server.unmask_requests(self._inputs)
            summed = self.server.finish(self.exchange(unmask))
        except SecAggAbort as err:
            self.outcome.aborted = str(err)
            return None
        finally:
            self.outcome.server_s = sum(self.server.stats.seconds.values())
            self.outcome.rejections = [str(r) for r in self.server.rejections]
        survivors = summed.survivors
        values = summed.sum[:-self.tail_levels]
        tail = summed.sum[-self.tail_levels:]
        self.outcome.survivors = tuple(survivors)
        self.outcome.refused = secure_sum_problem(values, tail, len(survivors))
        if self.outcome.refused is not None:  # a client lied inside its mask
            return None
        self.outcome.tail = tuple(int(t) for t in tail)
        omega = sum(self._weights[n] for n in survivors)
        return Combined([int8_weighted_mean(q, omega, self.clip) for q in self.scatter(values)],
                        norm_bounded=0)
