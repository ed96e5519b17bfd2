"""The default demo (``make demo``): final test accuracy and the simulation's wall time.

Runs ``fleetfl simulate`` with no options (the default fleet: digits CNN, 20 devices, 10 per
round, 30 rounds) ``--repeats`` times in fresh processes. ``wall_time_s`` is the simulation
itself as summary.json reports it (Ray start-up included); ``process_wall_time_s`` adds Python
and package imports.

    python -m benchmarks.demo [--repeats 3]
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
    args = parser.parse_args()
    runs = [simulate([], args.out / f"rep{i}")[0] for i in range(args.repeats)]
    keys = ("final_accuracy", "best_accuracy", "wall_time_s", "process_wall_time_s",
            "simulated_time_s", "uplink_bytes_per_client_round", "compression_ratio_uplink",
            "client_rounds", "unfit_total")
    emit("demo", {
        "repeats": args.repeats,
        "config": runs[0]["config"],
        "runs": [{**{k: r[k] for k in keys}, "uplink_breakdown": r["uplink_breakdown"]}
                 for r in runs],
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
    })


if __name__ == "__main__":
    main()
