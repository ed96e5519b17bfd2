"""Uplink/downlink bytes vs accuracy for compressed updates (issue 3's table).

Digits CNN, 20 clients with Dirichlet(0.5) label skew, 10 per round, 60 rounds, the same seeds
for every variant: dense fp32 (plain float32 updates and model, no entropy coding), int8
updates + int8 model, 50/75/90 % pruned + int8 (cubic schedule from round 2 to round 20); the
int8 variants zlib their blobs (lossless, ``compression.entropy_coding``). Bytes come
from the serialized Flower messages; "dense fp32 reply" is the plain-Flower reply (fp32
ArrayRecord of the model + metrics) for the same client-rounds.

    python -m benchmarks.compression [--rounds 60]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import emit, simulate

VARIANTS = {
    "dense fp32": ["compression.update_bits=32", "compression.downlink_bits=32",
                   "compression.entropy_coding=false"],
    "int8": ["compression.update_bits=8", "compression.downlink_bits=8"],
    "50% pruned + int8": ["compression.update_bits=8", "compression.downlink_bits=8",
                          "compression.prune_final_sparsity=0.5"],
    "75% pruned + int8": ["compression.update_bits=8", "compression.downlink_bits=8",
                          "compression.prune_final_sparsity=0.75"],
    "90% pruned + int8": ["compression.update_bits=8", "compression.downlink_bits=8",
                          "compression.prune_final_sparsity=0.9"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/compression"))
    args = parser.parse_args()
    base = [f"federation.rounds={args.rounds}", "compression.prune_start_round=2",
            "compression.prune_end_round=20", "output.plot=false"]
    results = []
    for name, overrides in VARIANTS.items():
        out = args.out / name.replace(" ", "").replace("%", "").replace("+", "_")
        summary, rows = simulate(base + overrides, out)
        results.append({
            "variant": name,
            "final_accuracy": summary["final_accuracy"],
            "mean_accuracy_last5": sum(r["accuracy"] for r in rows[-5:]) / 5,
            "uplink_bytes_per_client_round_final": rows[-1]["uplink_bytes"] / rows[-1]["received"],
            "uplink_bytes_per_client_round": summary["uplink_bytes_per_client_round"],
            "downlink_bytes_per_client_round": summary["downlink_bytes_per_client_round"],
            "compression_ratio_uplink": summary["compression_ratio_uplink"],
            "final_sparsity": summary["final_sparsity"],
            "uplink_bytes_total": summary["uplink_bytes_total"],
            "downlink_bytes_total": summary["downlink_bytes_total"],
        })
    dense = results[0]
    for r in results:
        r["uplink_reduction_vs_dense_fp32"] = (
            dense["uplink_bytes_per_client_round"] / r["uplink_bytes_per_client_round"])
        r["accuracy_points_lost"] = 100 * (dense["final_accuracy"] - r["final_accuracy"])
    emit("compression", {"rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
