"""What each feature saved (or cost) over a run, from the recorded rows: the end-of-run table.

Pure arithmetic on ``metrics.jsonl`` rows; no Flower here. The uplink is split into the steps
that turn plain Flower's float32 reply into what was sent, per client-round r with ``n_r``
replies, a model of ``V`` values of which ``K_r`` were unpruned, and ``b`` bytes per value
(1 for int8 updates, 4 for float32):

    reference  = Σ dense_uplink_bytes_r                  (plain Flower's fp32 replies, measured)
    pruning    = Σ n_r (V - K_r) · 4                      (fp32 values not sent)
    int8       = Σ n_r K_r (4 - b)                        (bytes per value saved)
    secagg     = Σ secagg_uplink_bytes_r                  (key and share messages, measured)
    encoding   = sent - secagg - (reference - pruning - int8)

so reference - pruning - int8 + encoding + secagg = sent exactly. ``encoding`` holds what the
counts cannot separate: zlib's gain, framing, and under secure aggregation the masked vector's
ring elements (⌈log2(2·127·n + 1)⌉ bits each instead of 8). Pruning is credited at float32
prices and int8 on the values left, so the two never count the same byte twice.

The downlink is compared with the float32 values of the model sent to every selected client
(:func:`fp32_model_bytes`), a lower bound of plain Flower's downlink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FP32_BYTES = 4


def uplink_breakdown(rows: Sequence[Mapping[str, Any]], update_bits: int) -> dict[str, int]:
    """The uplink's steps in bytes (see the module docstring); 0s for rows that predate
    ``values_total`` (no model size recorded)."""
    per_value = update_bits // 8
    secagg = sum(int(r.get("secagg_uplink_bytes", 0)) for r in rows)
    sent = sum(int(r["uplink_bytes"]) for r in rows) + secagg
    reference = sum(int(r["dense_uplink_bytes"]) for r in rows)
    pruning = int8 = 0
    for r in rows:
        total, kept, n = int(r.get("values_total", 0)), int(r.get("values_kept", 0)), \
            int(r["received"])
        pruning += n * (total - kept) * FP32_BYTES
        int8 += n * kept * (FP32_BYTES - per_value)
    encoding = sent - secagg - (reference - pruning - int8)
    return {"reference": reference, "pruning": pruning, "int8": int8, "encoding": encoding,
            "secagg": secagg, "sent": sent}


def fp32_model_bytes(rows: Sequence[Mapping[str, Any]]) -> int:
    """Σ selected_r · 4 V: the float32 values of the model sent to every selected client, what
    plain Flower's downlink carries at the least (its framing comes on top)."""
    return sum(int(r["selected"]) * int(r.get("values_total", 0)) * FP32_BYTES for r in rows)


def savings_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(feature, what it did) lines for the end-of-run table, from a summary with an
    ``uplink_breakdown`` (:func:`fleetfl.coordinator.report.build_summary`)."""
    up = summary["uplink_breakdown"]
    ref = up["reference"] or 1
    out = [("uplink as plain Flower fp32", f"{up['reference']:,d} B")]
    if up["pruning"]:
        out.append(("pruning (values not sent)", f"-{up['pruning']:,d} B "
                                                 f"({up['pruning'] / ref:.0%})"))
    if up["int8"]:
        out.append(("int8 updates (1 B a value, not 4)", f"-{up['int8']:,d} B "
                                                         f"({up['int8'] / ref:.0%})"))
    out.append(("encoding (zlib, framing, SecAgg ring)",
                f"{up['encoding']:+,d} B ({up['encoding'] / ref:+.0%})"))
    if up["secagg"]:
        out.append(("secure aggregation (keys, shares)",
                    f"+{up['secagg']:,d} B ({up['secagg'] / ref:+.0%})"))
    ratio = up["reference"] / up["sent"] if up["sent"] else 0.0
    out.append(("uplink sent", f"{up['sent']:,d} B ({ratio:.1f}x less)"))
    down, fp32 = summary["downlink_bytes_total"], summary.get("downlink_fp32_model_bytes", 0)
    if down and fp32:
        out.append(("downlink (model, masks)", f"{down:,d} B ({fp32 / down:.1f}x less than "
                                               f"its fp32 values alone)"))
    out.extend(_fleet_rows(summary))
    return out


def _fleet_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Memory plans and partial work, from the summary's totals."""
    out = []
    unfit, refused = summary.get("unfit_total", 0), summary.get("memory_refused_total", 0)
    out.append(("memory plans", f"{unfit:,d} draws left out (no plan fits), "
                                f"{refused:,d} plans refused"))
    kept = summary.get("stragglers_total", 0) - summary.get("dropped_stragglers_total", 0)
    out.append(("FedProx partial work", f"{kept:,d} straggler updates kept"))
    return out
