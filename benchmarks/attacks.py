"""Lying clients against the coordinator's defences, on the real round loop.

Digits CNN, 20 clients, 10 per round, 30 rounds (as issue 12 asks). The attackers are a fixed
2 or 4 of the 20 clients (about 1 or 2 per round of 10); each lies in every round it is
selected. Each attack runs with the defence on and off:

* ``huge``: float32 updates of 1e30 (valid blobs); defence ``aggregation.norm_bound_ratio=3``
  (off: 0).
* ``count``: int8, registering 2^62 examples; defence ``federation.max_examples_per_client`` =
  the largest honest shard (off: the default 10^6).
* ``clip``: int8, +127 everywhere and "everything clipped" tail counts; defence: the norm
  bound and trimmed tail counts (off: ``norm_bound_ratio=0``, ``trim_fraction=0``; the per-
  client clamp to 127 stays, as honest clients apply it).
* ``secagg``: SecAgg+, inputs of 2000 past the clients' own range check; defence: the sum's
  bounds check (off: patched out, for this measurement only).

Plus the cost of the defences when nobody attacks: honest runs with and without them, side by
side (accuracy, median seconds per round). It runs the ServerApp/strategy/ClientApp code
in-process through ``tests/loopback.py`` (no Flower transport: the lies are injected there),
so it imports from ``tests/``.

    python -m benchmarks.attacks [--rounds 30]

Prints JSON; ``benchmarks/results/attacks.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loopback import LoopbackGrid  # noqa: E402
from lying import (  # noqa: E402
    everything_clipped,
    out_of_range_secure_inputs,
    rewrite_registration,
    rewrite_update,
)

from benchmarks.common import PLAIN, emit  # noqa: E402
from fleetfl import protocol as P  # noqa: E402
from fleetfl.coordinator.config import load_config  # noqa: E402
from fleetfl.coordinator.server_app import RunOutcome, run_rounds  # noqa: E402
from fleetfl.tasks.builtin import DigitsTask  # noqa: E402

CLIENTS = 20


def base(rounds: int) -> list[str]:
    return [*PLAIN, "task.dataset=digits", "task.model=cnn",
            f"federation.num_clients={CLIENTS}",
            "federation.clients_per_round=10", f"federation.rounds={rounds}",
            "federation.local_epochs=2", "federation.lr=0.05", "fleet.mix={rpi4=1}",
            "compression.entropy_coding=false"]


def run(overrides: list[str], **grid: Any) -> tuple[RunOutcome, float]:
    cfg = load_config(None, overrides)
    outcome = RunOutcome()
    started = time.perf_counter()
    run_rounds(LoopbackGrid(cfg.federation.num_clients, errors_as_replies=True, **grid), cfg,
               outcome)
    return outcome, time.perf_counter() - started


def round_seconds(outcome: RunOutcome) -> float:
    times = [r["wall_time_s"] for r in outcome.rows]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def no_sum_check() -> Iterator[None]:
    from fleetfl.aggregation import aggregator

    with mock.patch.object(aggregator, "secure_sum_problem", lambda *a: None):
        yield


def attacks(liars: set[int]) -> dict[str, dict[str, Any]]:
    """Per attack: overrides (common, defended, undefended), grid kwargs, context managers."""
    every = dict.fromkeys(liars)
    largest = max(len(t) for t, _ in DigitsTask().federated_data(CLIENTS, 0).clients)
    nodes = {1000 + i for i in liars}

    def huge(r: Any) -> Any:
        return rewrite_update(r, lambda t: np.full_like(t, 1e30))

    def count(r: Any) -> Any:
        return rewrite_registration(r, **{P.NUM_EXAMPLES: 2**62})

    def secure_lie() -> contextlib.AbstractContextManager[None]:
        return out_of_range_secure_inputs(nodes, 2000)

    return {
        "huge": {"common": [], "on": [], "off": ["aggregation.norm_bound_ratio=0"],
                 "grid": {"tamper": {i: huge for i in every}}},
        "count": {"common": ["compression.update_bits=8"],
                  "on": [f"federation.max_examples_per_client={largest}"], "off": [],
                  "grid": {"tamper_query": {i: count for i in every}}},
        "clip": {"common": ["compression.update_bits=8"], "on": [],
                 "off": ["aggregation.norm_bound_ratio=0", "aggregation.trim_fraction=0"],
                 "grid": {"tamper": {i: everything_clipped for i in every}}},
        "secagg": {"common": ["compression.update_bits=8", "secagg.enabled=true"],
                   "on": [], "off": [], "grid": {}, "lie": secure_lie,
                   "off_context": no_sum_check},
    }


def summary(outcome: RunOutcome) -> dict[str, float]:
    last = outcome.rows[-1]
    return {"final_accuracy": round(float(last["accuracy"]), 4),
            "final_loss": float(last["loss"]),
            "failed_client_rounds": sum(int(r["failed"]) for r in outcome.rows),
            "norm_bounded": sum(int(r["norm_bounded"]) for r in outcome.rows),
            "secagg_refused": sum(int(r["secagg_refused"]) for r in outcome.rows),
            "max_clip": max(float(r["clip"]) for r in outcome.rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    result: dict[str, Any] = {"rounds": args.rounds, "clients": CLIENTS}
    # The defences' cost when nobody lies, side by side (A B A B).
    cost: dict[str, list] = {"on": [], "off": []}
    for _ in range(2):
        for name, sets in (("on", []), ("off", ["aggregation.norm_bound_ratio=0",
                                                 "aggregation.trim_fraction=0"])):
            outcome, _ = run([*base(args.rounds), "compression.update_bits=8", *sets])
            cost[name].append({**summary(outcome), "round_s": round_seconds(outcome)})
    result["no_attack"] = cost
    emit("attacks", result)
    for n_liars in (2, 4):
        liars = set(range(n_liars))
        for kind, spec in attacks(liars).items():
            row: dict[str, Any] = {}
            for side in ("on", "off"):
                lie: Callable[[], Any] = spec.get("lie", nothing)
                guard = spec.get("off_context", nothing) if side == "off" else nothing
                with lie(), guard():
                    outcome, _ = run([*base(args.rounds), *spec["common"], *spec[side]],
                                     **spec["grid"])
                row["defended" if side == "on" else "undefended"] = summary(outcome)
            result[f"{kind}/{n_liars}_liars"] = row
            emit("attacks", result)  # rewritten after every pair: a partial run keeps rows


if __name__ == "__main__":
    main()
