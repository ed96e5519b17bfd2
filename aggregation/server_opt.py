"""Server optimizers: the round's combined update Δ_t taken as a pseudo-gradient.

Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2 (FedAdam, FedYogi), and Hsu et
al. 2019 (FedAvgM). With w_t the global model and Δ_t the clients' combined update
(:mod:`fleetfl.aggregation.combine`), every rule returns the step s_t, and w_{t+1} = w_t + s_t:

* ``none`` (FedAvg/FedProx):  s = Δ
* ``fedavgm``:  v ← β v + Δ;  s = η v
* ``fedadam``:  m ← β₁ m + (1 − β₁) Δ;  v ← β₂ v + (1 − β₂) Δ²;  s = η̂_t m / (√v + τ)
* ``fedyogi``:  as ``fedadam`` with  v ← v − (1 − β₂) Δ² sign(v − Δ²)

η̂_t = η √(1 − β₂^t) / (1 − β₁^t) is Adam's bias correction at step t = 1, 2, ..., as Flower's
``FedAdam``/``FedYogi`` apply it (they count from the round number + 1). Defaults follow
Flower's: η = 0.1 (fedadam), 0.01 (fedyogi), 1.0 (fedavgm); β₁ = 0.9, β₂ = 0.99, τ = 10⁻³.
The state (t, m, v) is plain arrays, saved with each round's checkpoint so a resumed run goes
on exactly. All math in float64 per tensor; the step is returned in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RULES = ("none", "fedavgm", "fedadam", "fedyogi")
DEFAULT_LR = {"none": 1.0, "fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01}


@dataclass
class ServerOptimizer:
    """One rule of the module docstring, with its state."""

    rule: str = "none"
    lr: float = 0.0  # η; 0: the rule's default (DEFAULT_LR)
    momentum: float = 0.9  # β for fedavgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    t: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"server optimizer {self.rule!r} is not one of {', '.join(RULES)}")
        self.lr = self.lr or DEFAULT_LR[self.rule]

    def step(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """s_t for the combined update ``delta`` (tensor name → array); advances the state."""
        if self.rule == "none":
            return {k: np.asarray(d, np.float64) for k, d in delta.items()}
        self.t += 1
        d = {k: np.asarray(x, np.float64) for k, x in delta.items()}
        if self.rule == "fedavgm":
            self.v = {k: self.momentum * self.v.get(k, 0.0) + d[k] for k in d}
            return {k: self.lr * self.v[k] for k in d}
        self.m = {k: self.beta1 * self.m.get(k, 0.0) + (1 - self.beta1) * d[k] for k in d}
        sq = {k: d[k] * d[k] for k in d}
        if self.rule == "fedadam":
            self.v = {k: self.beta2 * self.v.get(k, 0.0) + (1 - self.beta2) * sq[k] for k in d}
        else:  # fedyogi
            self.v = {k: (v := self.v.get(k, np.zeros_like(sq[k])))
                      - (1 - self.beta2) * sq[k] * np.sign(v - sq[k]) for k in d}
        eta = self.lr * math.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        return {k: eta * self.m[k] / (np.sqrt(self.v[k]) + self.tau) for k in d}

    def state(self) -> dict[str, Any]:
        """Plain values and arrays, for a checkpoint."""
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output."""
        self.t = int(state.get("t", 0))
        self.m = {k: np.asarray(a, np.float64) for k, a in dict(state.get("m", {})).items()}
        self.v = {k: np.asarray(a, np.float64) for k, a in dict(state.get("v", {})).items()}


def apply_step(base: dict[str, np.ndarray], step: dict[str, np.ndarray],
               masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """w_{t+1} = w_t + s_t in each tensor's dtype, with s_t zeroed where a mask prunes: a
    server step with memory (momentum) must not revive a pruned weight."""
    return {k: w + (step[k] * masks[k] if k in masks else step[k]).astype(w.dtype, copy=False)
            for k, w in base.items()}
