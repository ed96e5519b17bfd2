"""The default demo (``make demo``): final test accuracy and the simulation's wall time.

Runs ``fleetfl simulate`` with no options (the default fleet: digits CNN, 20 devices, 10 per
round, 30 rounds) ``--repeats`` times in fresh processes. ``wall_time_s`` is the simulation
itself as summary.json reports it (Ray start-up included); ``process_wall_time_s`` adds Python
and package imports.

    python -m benchmarks.demo [--repeats 3] [--ab KEY=VALUE] [--label demo]

``--ab KEY=VALUE`` also runs the demo with that setting, alternating the two (A B, B A, ...), and
reports both medians side by side (``variants``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import emit, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/demo"))
    parser.add_argument("--ab", metavar="KEY=VALUE", help="also run with this setting")
    parser.add_argument("--label", default="demo", help="results file name")
    args = parser.parse_args()
    variants: list[list[str]] = [[], [args.ab]] if args.ab else [[]]
    runs: dict[int, list[dict]] = {v: [] for v in range(len(variants))}
    for i in range(args.repeats):
        for v in (range(len(variants)) if i % 2 == 0 else reversed(range(len(variants)))):
            runs[v].append(simulate(variants[v], args.out / f"v{v}-rep{i}")[0])
    keys = ("final_accuracy", "best_accuracy", "wall_time_s", "process_wall_time_s",
            "simulated_time_s", "uplink_bytes_per_client_round", "compression_ratio_uplink",
            "client_rounds", "unfit_total")

    def summary(rows: list[dict]) -> dict:
        return {"runs": [{**{k: r[k] for k in keys}, "uplink_breakdown": r["uplink_breakdown"]}
                         for r in rows],
                "median": {k: statistics.median(r[k] for r in rows) for k in keys}}

    first = summary(runs[0])
    emit(args.label, {
        "repeats": args.repeats,
        "config": runs[0][0]["config"],
        **first,
        "variants": [{"overrides": variants[v], **summary(runs[v])} for v in runs],
    })


if __name__ == "__main__":
    main()
