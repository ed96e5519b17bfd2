"""Seconds per round of Shakespeare on this machine: plain, and with int8 updates + 50 %
pruning + secure aggregation, measured side by side (runs interleaved A B A B).

10 clients per round out of 143, the ``small`` model, at most ``--max-samples`` training
windows per client, batch 10, lr 0.8; at E = 20 (the FedProx setting) and E = 1 (where the
round's fixed costs show). Pruning reaches 50 % at round 2. The first round of each run (Ray
start-up, first imports) is left out; per run the median of the other rounds' wall seconds,
then the median over runs.

    python -m benchmarks.shakespeare_round_time [--rounds 6] [--repeats 2]

Prints JSON; ``benchmarks/results/shakespeare_round_time.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import PLAIN, emit, simulate

CONFIGS = {
    "plain": [],
    "int8+prune50+secagg": ["compression.update_bits=8", "compression.prune_final_sparsity=0.5",
                            "compression.prune_start_round=1", "compression.prune_end_round=2",
                            "secagg.enabled=true"],
}


def base(rounds: int, epochs: int, max_samples: int) -> list[str]:
    return [*PLAIN, "task.name=shakespeare", f"task.params.max_samples={max_samples}",
            "federation.num_clients=143", "federation.clients_per_round=10",
            f"federation.rounds={rounds}", f"federation.local_epochs={epochs}",
            "federation.batch_size=10", "federation.lr=0.8", "fleet.mix={rpi4=1}",
            "output.plot=false"]


def round_seconds(rows: list[dict]) -> list[float]:
    """Wall seconds of rounds 2.. (``wall_time_s`` is cumulative)."""
    times = [r["wall_time_s"] for r in rows]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/shakespeare_time"))
    args = parser.parse_args()
    result: dict[str, dict] = {}
    for epochs in (20, 1):
        per_run: dict[str, list[float]] = {name: [] for name in CONFIGS}
        extra: dict[str, dict] = {}
        for rep in range(args.repeats):
            for name, overrides in CONFIGS.items():
                out = args.out / f"e{epochs}-{name}-{rep}"
                summary, rows = simulate(base(args.rounds, epochs, args.max_samples)
                                         + overrides, out)
                per_run[name].append(statistics.median(round_seconds(rows)))
                extra[name] = {"uplink_bytes_per_client_round":
                               summary["uplink_bytes_per_client_round"],
                               "final_sparsity": summary["final_sparsity"],
                               "final_accuracy": summary["final_accuracy"]}
        medians = {name: statistics.median(v) for name, v in per_run.items()}
        result[f"E={epochs}"] = {
            name: {"median_round_s": medians[name], "per_run_median_s": per_run[name],
                   **extra[name]} for name in CONFIGS}
        result[f"E={epochs}"]["ratio_compressed_over_plain"] = (
            medians["int8+prune50+secagg"] / medians["plain"])
        emit("shakespeare_round_time", {"rounds": args.rounds, "repeats": args.repeats,
                                        "max_samples": args.max_samples, **result})


if __name__ == "__main__":
    main()
