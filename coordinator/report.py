"""Run outputs: ``metrics.jsonl`` rows, ``summary.json``, ``report.png`` and the final table.

Pure functions of the recorded rows; no Flower here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleetfl.coordinator.savings import fp32_model_bytes, uplink_breakdown

SUMMARY_FIELDS = (
    "rounds",
    "final_accuracy",
    "final_loss",
    "uplink_bytes_total",
    "downlink_bytes_total",
    "uplink_bytes_per_client_round",
    "wall_time_s",
    "simulated_time_s",
    "clients_total",
    "compression_ratio_uplink",
    "config",
)


def append_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append one round's record to ``metrics.jsonl`` (one JSON object per line)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def build_summary(
    rows: Sequence[Mapping[str, Any]],
    *,
    config: Mapping[str, Any],
    clients_total: int,
    wall_time_s: float,
    initial: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` object: the fields of docs/architecture.md plus a few totals."""
    if not rows:
        raise ValueError("no finished round to summarize")
    last = rows[-1]
    up = sum(int(r["uplink_bytes"]) for r in rows)
    received = sum(int(r["received"]) for r in rows)
    return {
        "rounds": len(rows),
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "final_train_loss": last["train_loss"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "initial_accuracy": (initial or {}).get("accuracy"),
        "uplink_bytes_total": up,
        "downlink_bytes_total": sum(int(r["downlink_bytes"]) for r in rows),
        "uplink_bytes_per_client_round": up / received if received else 0.0,
        # Plain Flower's fp32 replies for the same client-rounds, over what we actually sent.
        "compression_ratio_uplink": (
            sum(int(r["dense_uplink_bytes"]) for r in rows) / up if up else 0.0),
        "downlink_bytes_per_client_round": (
            sum(int(r["downlink_bytes"]) for r in rows)
            / max(1, sum(int(r["selected"]) for r in rows))),
        "final_sparsity": last["sparsity"],
        "uplink_breakdown": uplink_breakdown(
            rows, int(config.get("compression", {}).get("update_bits", 32))),
        "downlink_fp32_model_bytes": fp32_model_bytes(rows),
        "client_rounds": received,
        "aggregated_total": sum(int(r["aggregated"]) for r in rows),
        "stragglers_total": sum(int(r["stragglers"]) for r in rows),
        "dropped_stragglers_total": sum(int(r["dropped_stragglers"]) for r in rows),
        "rejected_total": sum(int(r["rejected"]) for r in rows),
        "failed_total": sum(int(r["failed"]) for r in rows),
        "missed_deadline_total": sum(int(r["missed_deadline"]) for r in rows),
        # Memory planning: cohort draws left out (no plan fits) and plans a client refused.
        "unfit_total": sum(int(r.get("unfit", 0)) for r in rows),
        "memory_refused_total": sum(int(r.get("memory_refused", 0)) for r in rows),
        # Secure aggregation's cost: its extra messages (bytes) and the coordinator's compute.
        "secagg_uplink_bytes_total": sum(int(r.get("secagg_uplink_bytes", 0)) for r in rows),
        "secagg_downlink_bytes_total": sum(int(r.get("secagg_downlink_bytes", 0))
                                           for r in rows),
        "secagg_server_s_total": sum(float(r.get("secagg_server_s", 0.0)) for r in rows),
        "secagg_rounds_aborted": sum(int(r.get("secagg_aborted", 0)) for r in rows),
        "wall_time_s": wall_time_s,
        "simulated_time_s": last["simulated_time_s"],
        "clients_total": clients_total,
        "config": dict(config),
    }


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary.json`` atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def plot_report(path: Path, rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """Accuracy and loss against round and against simulated time, as a 2×2 PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: devices and CI have no display
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    sim = [r["simulated_time_s"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for col, (xs, xlabel) in enumerate(((rounds, "round"), (sim, "simulated time (s)"))):
        axes[0, col].plot(xs, [r["accuracy"] for r in rows], marker=".")
        axes[0, col].set(xlabel=xlabel, ylabel="test accuracy", ylim=(0, 1))
        axes[1, col].plot(xs, [r["loss"] for r in rows], marker=".", label="test loss")
        axes[1, col].plot(xs, [r["train_loss"] for r in rows], marker=".", label="train loss")
        axes[1, col].set(xlabel=xlabel, ylabel="cross-entropy")
        axes[1, col].legend()
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
