"""How the 1e30 attack fares against each defence setting, and what each costs honest runs.

Digits CNN, 20 clients, 10 per round, 30 rounds (as ``benchmarks.attacks``), float32
updates; 2 (or 4) of the 20 clients send valid update blobs full of 1e30 in every round they
are selected. Settings: ``aggregation.norm_bound_ratio`` 2, 3, 5 (the median-relative norm
bound) and ``aggregation.robust`` ``trimmed_mean`` (``trim_fraction`` 0.2) and ``median``;
each also without attackers. In-process through ``tests/loopback.py``, like
``benchmarks.attacks``.

    python -m benchmarks.attacks_sweep

Prints one line per run; ``benchmarks/results/attacks_sweep.json``.
"""

from __future__ import annotations

from typing import Any

from benchmarks import attacks as A
from benchmarks.common import emit


def main() -> None:
    out: dict[str, Any] = {}

    def go(name: str, sets: list[str], liars: set[int]) -> None:
        grid = A.attacks(liars)["huge"]["grid"] if liars else {}
        outcome, _ = A.run([*A.base(30), *sets], **grid)
        out[name] = {**A.summary(outcome), "round_s": A.round_seconds(outcome)}
        print(name, out[name]["final_accuracy"], out[name]["norm_bounded"], flush=True)

    for ratio in (2, 3, 5):
        sets = [f"aggregation.norm_bound_ratio={ratio}"]
        go(f"ratio{ratio}/honest", sets, set())
        go(f"ratio{ratio}/2_liars", sets, {0, 1})
    for rule in ("trimmed_mean", "median"):
        sets = [f"aggregation.robust={rule}", "aggregation.trim_fraction=0.2"]
        go(f"{rule}/honest", sets, set())
        go(f"{rule}/2_liars", sets, {0, 1})
        go(f"{rule}/4_liars", sets, {0, 1, 2, 3})
    emit("attacks_sweep", {"rounds": 30, "runs": out})


if __name__ == "__main__":
    main()
